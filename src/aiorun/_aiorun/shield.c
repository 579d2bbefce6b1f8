/* shutdown_waits_for(): run a coroutine as a task that the shutdown phase
 * does not cancel, and hand back an awaitable for its outcome.
 *
 * The awaitable (ShutdownWaiter) never lets the awaiting task reach the
 * protected task: it yields a ShutdownWaitFuture (waitfuture.c), which
 * wakes the awaiting task when the protected one ends but, cancelled, ends
 * only the wait.  So cancelling the awaiting task gives it CancelledError
 * at once while the protected work runs on.  Cancelling the protected task
 * itself reaches the awaiting side through task.result().
 *
 * It has __await__, send, throw and close, so it is a
 * collections.abc.Coroutine: await, create_task() and ensure_future() all
 * accept it.  The step logic lives in waiter_step(); the rest wraps it. */
#include "aiorun.h"

#include <structmember.h>  /* T_PYSSIZET, READONLY on 3.9-3.11 */

typedef enum {
    WAITER_FRESH,    /* not yet awaited */
    WAITER_WAITING,  /* yielded `wait` to the awaiting task */
    WAITER_DONE      /* finished: returned, raised or closed */
} waiter_phase;

typedef struct {
    PyObject_HEAD
    PyObject *task;     /* the protected task (or future) */
    PyObject *loop;
    PyObject *wait;     /* the ShutdownWaitFuture yielded, once WAITING */
    PyObject *weakreflist;
    waiter_phase phase;
} WaiterObject;

typedef enum { STEP_ERROR = -1, STEP_RETURN = 0, STEP_YIELD = 1 } step_result;

static aiorun_state *
waiter_state(WaiterObject *self)
{
    return aiorun_get_state_by_type(Py_TYPE(self));
}

/* The awaiter stopped waiting (it was cancelled, or the waiter was closed
 * or never awaited): should the protected coroutine fail later, nobody
 * retrieves its exception, and asyncio would report "Task exception was
 * never retrieved" (which stops the app under stop_on_unhandled_errors).
 * The original stays silent; we log it once as a WARNING instead
 * (aiorun_protected_orphan_done).  Keeps any exception that is set. */
static void
watch_orphan(PyObject *task, PyTypeObject *type)
{
    PyObject *exc_type, *value, *tb;
    PyErr_Fetch(&exc_type, &value, &tb);
    aiorun_state *st = aiorun_get_state_by_type(type);
    /* An ended task is looked at now: its add_done_callback() would go
     * through call_soon(), which a closed loop (a waiter finalized after
     * run()) or another thread (the collector's) must not be asked for. */
    int done = aiorun_call_predicate(task, st->s_done);
    PyObject *res = NULL;
    if (done > 0) {
        PyObject *module = PyType_GetModule(type);   /* borrowed: the type holds it */
        res = module ? aiorun_protected_orphan_done(module, task) : NULL;
    }
    else if (done == 0) {
        res = PyObject_CallMethodOneArg(task, st->s_add_done_callback, st->orphan_done);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(task);
    }
    Py_XDECREF(res);
    PyErr_Restore(exc_type, value, tb);
}

/* How a waiter ends. */
typedef enum {
    END_TASK_ENDED,  /* the protected task's outcome was delivered */
    END_DETACH,      /* its awaiter stopped waiting, or it was never awaited */
    END_CLOSE        /* close() while awaited: wake the awaiter with an error */
} waiter_end;

/* Stop listening to the protected task.  Keeps any exception that is set.
 * Once the task has ended its callbacks have already run, so there is
 * nothing to take back from it. */
static void
waiter_finish(WaiterObject *self, waiter_end how)
{
    /* Out of the field first: taking the wake-ups back runs the task's
     * remove_done_callback() and callbacks' __eq__, which may close() or
     * throw() into this very waiter. */
    PyObject *wait = self->wait;
    int orphaned = how != END_TASK_ENDED && self->phase != WAITER_DONE
                   && self->task != NULL;
    self->wait = NULL;
    self->phase = WAITER_DONE;
    if (wait != NULL && how == END_DETACH) {
        aiorun_waitfuture_detach(wait);
    }
    else if (wait != NULL && how == END_CLOSE) {
        /* As a coroutine closed under its awaiter: that one resumes and
         * fails ("cannot reuse already awaited coroutine"), never left
         * pending with nobody to wake it. */
        aiorun_waitfuture_close(wait);
    }
    Py_XDECREF(wait);
    if (orphaned) {
        PyObject *task = Py_NewRef(self->task);
        watch_orphan(task, Py_TYPE(self));
        Py_DECREF(task);
    }
}

static void
waiter_detach(WaiterObject *self)
{
    waiter_finish(self, END_DETACH);
}

/* Yield to the awaiting task what it must wait on, as Future.__await__
 * yields the future itself. */
static step_result
waiter_yield(WaiterObject *self, PyObject **result)
{
    aiorun_state *st = waiter_state(self);
    /* A cancelled wait is spent: the next yield needs a fresh one. */
    if (self->wait == NULL || !aiorun_waitfuture_arm(self->wait)) {
        /* The spent one goes first: making the new one may collect garbage
         * and run a __del__ that closes this waiter. */
        Py_CLEAR(self->wait);
        PyObject *wait = aiorun_waitfuture_new(st, self->task, self->loop);
        if (wait == NULL) {
            return STEP_ERROR;
        }
        Py_XSETREF(self->wait, wait);
    }
    self->phase = WAITER_WAITING;
    *result = Py_NewRef(self->wait);
    return STEP_YIELD;
}

static step_result
waiter_step_impl(WaiterObject *self, PyObject **result)
{
    aiorun_state *st = waiter_state(self);
    *result = NULL;
    if (self->phase == WAITER_DONE) {
        PyErr_SetString(PyExc_RuntimeError,
                        "cannot reuse already awaited coroutine");
        return STEP_ERROR;
    }
    int done = aiorun_call_predicate(self->task, st->s_done);
    if (done < 0) {
        waiter_detach(self);
        return STEP_ERROR;
    }
    if (!done) {
        /* Waiting already: this is a second task awaiting the same
         * object, which a coroutine refuses too.  (The first awaiter comes
         * back only once the task has ended, or through throw() when its
         * wait was cancelled, even before that wake-up has run.) */
        if (self->phase == WAITER_WAITING && self->wait != NULL) {
            PyErr_SetString(PyExc_RuntimeError, "coroutine is being awaited already");
            return STEP_ERROR;
        }
        return waiter_yield(self, result);
    }
    waiter_finish(self, END_TASK_ENDED);
    /* The protected task's outcome: its result, its exception, or
     * CancelledError if it was cancelled directly. */
    *result = PyObject_CallMethodNoArgs(self->task, st->s_result);
    return *result ? STEP_RETURN : STEP_ERROR;
}

/* Every way in (send, __next__, am_send, throw, close) holds a critical
 * section on the waiter (aiorun.h). */
static step_result
waiter_step(WaiterObject *self, PyObject **result)
{
    step_result rc;
    AIORUN_LOCKED(self, rc, waiter_step_impl(self, result));
    return rc;
}

/* Turn a STEP_RETURN into StopIteration(value), as generators do. */
static PyObject *
stop_iteration(PyObject *value)
{
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *
waiter_iternext(WaiterObject *self)
{
    PyObject *result;
    switch (waiter_step(self, &result)) {
    case STEP_YIELD:
        return result;
    case STEP_RETURN:
        if (result == Py_None) {
            Py_DECREF(result);
            return NULL;  /* tp_iternext may end without StopIteration */
        }
        return stop_iteration(result);
    default:
        return NULL;
    }
}

static PyObject *
waiter_send(WaiterObject *self, PyObject *value)
{
    PyObject *result;
    (void)value;  /* the awaiting task only ever sends None */
    switch (waiter_step(self, &result)) {
    case STEP_YIELD:
        return result;
    case STEP_RETURN:
        return stop_iteration(result);
    default:
        return NULL;
    }
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult
waiter_am_send(WaiterObject *self, PyObject *value, PyObject **result)
{
    (void)value;
    switch (waiter_step(self, result)) {
    case STEP_YIELD:
        return PYGEN_NEXT;
    case STEP_RETURN:
        return PYGEN_RETURN;
    default:
        return PYGEN_ERROR;
    }
}
#endif

/* In throw(): is what is thrown in the protected task's own outcome, which
 * the awaiting task's wake-up (given straight to that task) has just
 * retrieved?  Then nobody stopped waiting and there is no orphan.  Anything
 * else (the wait cancelled, an exception of the app's own thrown in) leaves
 * the task's outcome to watch_orphan().  `thrown` may be NULL. */
static int
outcome_delivered(WaiterObject *self, PyObject *thrown)
{
    if (self->phase != WAITER_WAITING || self->wait == NULL
        || aiorun_waitfuture_cancelled(self->wait)) {
        return 0;
    }
    aiorun_state *st = waiter_state(self);
    /* Our own references: done() and the rest may run code that sends a
     * new wait in, or closes this waiter. */
    PyObject *wait = Py_NewRef(self->wait), *task = Py_NewRef(self->task);
    PyObject *outcome = NULL;
    int done = aiorun_call_predicate(task, st->s_done);
    int cancelled = done > 0 ? aiorun_call_predicate(task, st->s_cancelled) : 0;
    int delivered = 0;
    if (done < 0 || cancelled < 0) {
        delivered = -1;
    }
    else if (cancelled) {
        delivered = thrown != NULL
            && PyErr_GivenExceptionMatches(thrown, st->CancelledError);
    }
    else if (done) {
        outcome = PyObject_CallMethodNoArgs(task, st->s_exception);
        delivered = outcome == NULL ? -1 : outcome == thrown;
    }
    if (delivered < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
        delivered = 0;
    }
    /* The verdict is for this wait only. */
    delivered = delivered && self->wait == wait;
    Py_XDECREF(outcome);
    Py_DECREF(wait);
    Py_DECREF(task);
    return delivered;
}

/* throw(exc) / throw(type[, value[, tb]]): the exception surfaces at the
 * await, so it propagates to the awaiting task; the protected task runs on. */
static PyObject *
waiter_throw_impl(WaiterObject *self, PyObject *args)
{
    PyObject *type, *value = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &type, &value, &tb)) {
        return NULL;
    }
    /* Checked first, as a coroutine's throw() does: a call with bad
     * arguments changes nothing. */
    if (tb == Py_None) {
        tb = NULL;
    }
    if (tb != NULL && !PyTraceBack_Check(tb)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback");
        return NULL;
    }
    int instance = PyExceptionInstance_Check(type);
    if (instance && value != NULL && value != Py_None) {
        PyErr_SetString(PyExc_TypeError,
                        "instance exception may not have a separate value");
        return NULL;
    }
    if (!instance && !PyExceptionClass_Check(type)) {
        PyErr_Format(PyExc_TypeError,
                     "exceptions must be classes or instances deriving from "
                     "BaseException, not %.200s", Py_TYPE(type)->tp_name);
        return NULL;
    }
    PyObject *thrown = instance ? type
                       : value != NULL && PyExceptionInstance_Check(value) ? value : NULL;
    waiter_finish(self, outcome_delivered(self, thrown) ? END_TASK_ENDED : END_DETACH);
    if (instance) {
        /* PyException_GetTraceback returns a new reference already. */
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(type)), Py_NewRef(type),
                      tb ? Py_NewRef(tb) : PyException_GetTraceback(type));
        return NULL;
    }
    PyErr_Restore(Py_NewRef(type), Py_XNewRef(value == Py_None ? NULL : value),
                  Py_XNewRef(tb));
    return NULL;
}

static PyObject *
waiter_close_impl(WaiterObject *self, PyObject *unused)
{
    (void)unused;
    waiter_finish(self, END_CLOSE);
    Py_RETURN_NONE;
}

AIORUN_LOCKED_O(waiter_throw, waiter_throw_impl)
AIORUN_LOCKED_NOARGS(waiter_close, waiter_close_impl)

static PyObject *
waiter_await(WaiterObject *self)
{
    return Py_NewRef((PyObject *)self);
}

static PyObject *
waiter_get_none(WaiterObject *self, void *closure)
{
    (void)self;
    (void)closure;
    Py_RETURN_NONE;
}

static PyObject *
waiter_get_false(WaiterObject *self, void *closure)
{
    (void)self;
    (void)closure;
    Py_RETURN_FALSE;
}

static PyObject *
waiter_get_await(WaiterObject *self, void *closure)
{
    (void)closure;
    PyObject *wait;
    AIORUN_LOCKED(self, wait, Py_NewRef(self->wait ? self->wait : Py_None));
    return wait;
}

static PyObject *
waiter_get_task(WaiterObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->task);
}

/* The names of the coroutine the original's shutdown_waits_for() returns,
 * so that task reprs and logs read as they did. */
#define WAITER_NAME "inner"
#define WAITER_QUALNAME "shutdown_waits_for.<locals>.inner"

static PyObject *
waiter_get_name(WaiterObject *self, void *closure)
{
    (void)self;
    return PyUnicode_FromString(closure ? WAITER_QUALNAME : WAITER_NAME);
}

static PyObject *
waiter_repr(WaiterObject *self)
{
    return PyUnicode_FromFormat("<coroutine object " WAITER_QUALNAME " at %p>", self);
}

static int
waiter_traverse(WaiterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->task);
    Py_VISIT(self->loop);
    Py_VISIT(self->wait);
    return 0;
}

static int
waiter_clear(WaiterObject *self)
{
    Py_CLEAR(self->task);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->wait);
    return 0;
}

/* A waiter dropped before it finished (never awaited: the "bare" call, or
 * its awaiting task destroyed) leaves the protected task to itself. */
static void
waiter_finalize(WaiterObject *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (self->phase != WAITER_DONE) {
        waiter_detach(self);
    }
    PyErr_Restore(type, value, tb);
}

static void
waiter_dealloc(WaiterObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
#ifdef PYPY_VERSION
    /* PyPy's cpyext has no tp_finalize (a type with one dies with "missing
     * slot wrapper wrap_del"): the same work here.  It never hands `self`
     * to Python code, so nothing can resurrect it, and waiter_finish()
     * holds its own references to the task and the wait. */
    waiter_finalize(self);
#else
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return;   /* resurrected by the finalizer */
    }
#endif
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    (void)waiter_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(type);
}

static PyMethodDef waiter_methods[] = {
    {"send", (PyCFunction)waiter_send, METH_O, "send(value) -> next yielded value"},
    {"throw", (PyCFunction)waiter_throw, METH_VARARGS,
     "throw(exc) -> raise exc at the await"},
    {"close", (PyCFunction)waiter_close, METH_NOARGS, "close() -> None"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef waiter_getset[] = {
    {"__name__", (getter)waiter_get_name, NULL, "As the original's coroutine.", NULL},
    {"__qualname__", (getter)waiter_get_name, NULL, "As the original's coroutine.",
     "qualname"},
    /* What asyncio's task introspection (repr, get_stack) looks for. */
    {"cr_frame", (getter)waiter_get_none, NULL, "No Python frame.", NULL},
    {"cr_running", (getter)waiter_get_false, NULL, "Never running.", NULL},
    {"cr_await", (getter)waiter_get_await, NULL, "The future awaited.", NULL},
    {"task", (getter)waiter_get_task, NULL, "The protected task.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef waiter_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(WaiterObject, weakreflist), READONLY,
     NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot waiter_slots[] = {
    {Py_tp_doc, "What shutdown_waits_for() returns: await it, pass it to "
                "create_task() or ensure_future(), or drop it; the protected work "
                "runs to its end either way, and its task attribute is that work's "
                "task."},
    {Py_tp_new, aiorun_refuse_new},
    {Py_tp_dealloc, waiter_dealloc},
#ifndef PYPY_VERSION
    {Py_tp_finalize, waiter_finalize},
#endif
    {Py_tp_traverse, waiter_traverse},
    {Py_tp_clear, waiter_clear},
    {Py_tp_repr, waiter_repr},
    {Py_tp_iter, waiter_await},
    {Py_tp_iternext, waiter_iternext},
    {Py_tp_methods, waiter_methods},
    {Py_tp_getset, waiter_getset},
    {Py_tp_members, waiter_members},
    {Py_am_await, waiter_await},
#if PY_VERSION_HEX >= 0x030A0000
    {Py_am_send, waiter_am_send},
#endif
    {0, NULL},
};

PyType_Spec aiorun_waiter_type_spec = {
    .name = "aiorun._aiorun.ShutdownWaiter",
    .basicsize = sizeof(WaiterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = waiter_slots,
};

PyObject *
aiorun_task_coro(aiorun_state *st, PyObject *task)
{
    PyObject *coro = PyObject_CallMethodNoArgs(task, st->s_get_coro);
    if (coro != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return coro;
    }
    PyErr_Clear();
    coro = PyObject_GetAttr(task, st->s_coro);
    if (coro == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return coro;
}

PyObject *
aiorun_protected_orphan_done(PyObject *module, PyObject *task)
{
    aiorun_state *st = aiorun_get_state(module);
    PyObject *exc = NULL, *coro = NULL, *name = NULL;
    int cancelled = aiorun_call_predicate(task, st->s_cancelled);
    if (cancelled != 0) {
        goto done;   /* cancelled directly: nothing to report */
    }
    exc = PyObject_CallMethodNoArgs(task, st->s_exception);   /* now retrieved */
    if (exc == NULL || exc == Py_None) {
        goto done;
    }
    coro = aiorun_task_coro(st, task);
    name = coro ? aiorun_optional_attr(coro, "__qualname__") : NULL;
    if (name == NULL && !PyErr_Occurred()) {
        name = PyObject_Repr(task);
    }
    if (name != NULL) {
        (void)aiorun_log_exc(st, LOG_WARNING, "The coroutine %s, protected by "
                             "shutdown_waits_for(), raised after its awaiter had "
                             "stopped waiting:", name, exc);
    }
done:
    if (PyErr_Occurred()) {
        aiorun_log_current_error(st, "Could not report a protected coroutine's error");
    }
    Py_XDECREF(exc);
    Py_XDECREF(coro);
    Py_XDECREF(name);
    Py_RETURN_NONE;
}

/* The mark of a task started by shutdown_waits_for(), kept on the task
 * itself: the original puts the task's coroutine in a WeakSet, and that
 * entry, with the weakref callback that takes it out again, was about half
 * of what a protection cost here (bench/RESULTS.md).  Task classes without
 * a __dict__ get the WeakSet entry instead. */
static int
mark_protected(aiorun_state *st, PyObject *task)
{
    if (PyObject_SetAttr(task, st->s_protected, Py_True) == 0) {
        return 0;
    }
    /* Refused (no __dict__, a frozen task class): the WeakSet instead. */
    if (PyErr_ExceptionMatches(PyExc_MemoryError)) {
        return -1;
    }
    PyErr_Clear();
    PyObject *coro = aiorun_task_coro(st, task);
    if (coro == NULL || coro == Py_None) {
        Py_XDECREF(coro);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *res = PyObject_CallMethodOneArg(st->do_not_cancel, st->s_add, coro);
    Py_DECREF(coro);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

#if PY_VERSION_HEX < 0x030C0000 && !defined(PYPY_VERSION)
/* tp_traverse visitor: keeps the first Context it is shown. */
static int
first_context(PyObject *obj, void *found)
{
    if (obj != NULL && PyContext_CheckExact(obj)) {
        *(PyObject **)found = obj;
        return 1;   /* stop */
    }
    return 0;
}
#endif

/* The context a task runs its steps in (a new reference), or NULL with no
 * exception when it cannot be known. */
static PyObject *
task_context(aiorun_state *st, PyObject *task)
{
    PyObject *context = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *getter;
    if (PyObject_GetOptionalAttr(task, st->s_get_context, &getter) > 0) {
        context = PyObject_CallNoArgs(getter);
        Py_DECREF(getter);
    }
#elif !defined(PYPY_VERSION)
    /* Before 3.12 the C Task keeps its context to itself; its traverse
     * shows it first (task_context, before the future's fields, whose
     * callbacks' contexts are other tasks').  The C Task's own traverse,
     * not a subclass's, which would show the subclass's slots first.  No
     * code runs before the reference is held. */
    if (st->CTask != Py_None && PyObject_TypeCheck(task, (PyTypeObject *)st->CTask)) {
        PyObject *found = NULL;
        traverseproc traverse = ((PyTypeObject *)st->CTask)->tp_traverse;
        if (traverse != NULL) {
            (void)traverse(task, first_context, &found);
        }
        return Py_XNewRef(found);
    }
#endif
    /* The Python Task (PyPy's, asyncio's own _PyTask) keeps it here. */
    if (context == NULL && !PyErr_Occurred()) {
        (void)PyObject_GetOptionalAttr(task, st->s_context, &context);
    }
    if (context != NULL && !aiorun_is_context(st, context)) {
        Py_CLEAR(context);   /* a task-like's own idea of a context */
    }
    return context;
}

/* 1 if task was started inside protected work (its context carries the
 * mark shutdown_waits_for() set while it made the protected task), 0 if
 * not or unknown, -1 on error. */
static int
started_by_protected_work(aiorun_state *st, PyObject *task)
{
    PyObject *context = task_context(st, task);
    if (context == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int found = PySequence_Contains(context, st->protected_var);
    Py_DECREF(context);
    return found;
}

int
aiorun_task_marked(aiorun_state *st, PyObject *task)
{
    PyObject *mark;
    int found = PyObject_GetOptionalAttr(task, st->s_protected, &mark);
    if (found > 0) {
        /* True itself: a task-like whose __getattr__ answers anything is
         * not protected by that, and no __bool__ of the app's runs. */
        found = mark == Py_True;
        Py_DECREF(mark);
    }
    return found;
}

int
aiorun_is_protected(aiorun_state *st, PyObject *task)
{
    int found = aiorun_task_marked(st, task);
    if (found != 0) {
        return found;
    }
    /* Work that protected work started (gather(), create_task(), a
     * TaskGroup, wait_for() before 3.12) is protected with it. */
    if ((found = started_by_protected_work(st, task)) != 0) {
        return found;
    }
    /* Not marked: its coroutine may still be one the app put in
     * _DO_NOT_CANCEL_COROS itself, as the original allows. */
    PyObject *coro = aiorun_task_coro(st, task);
    if (coro == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    found = coro == Py_None ? 0 : aiorun_weakset_contains(st, coro);
    Py_DECREF(coro);
    return found;
}

static PyObject *
current_loop(aiorun_state *st)
{
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop == NULL || loop != Py_None) {
        return loop;
    }
    Py_DECREF(loop);
    return PyObject_CallNoArgs(st->get_event_loop);
}

/* The arguments of a call that is not the usual shutdown_waits_for(coro),
 * checked and unpacked the way a def would.  *coro and *loop are borrowed
 * from args (or from kwnames' values), which the caller holds. */
static int
parse_general_call(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                   PyObject **coro, PyObject **loop)
{
    static char *kwlist[] = {"coro", "loop", NULL};
    PyObject *tuple = PyTuple_New(nargs), *kwargs = NULL;
    int ok = tuple != NULL;
    for (Py_ssize_t i = 0; ok && i < nargs; i++) {
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (ok && nkw > 0) {
        ok = (kwargs = PyDict_New()) != NULL;
        for (Py_ssize_t i = 0; ok && i < nkw; i++) {
            ok = PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) == 0;
        }
    }
    ok = ok && aiorun_check_call("shutdown_waits_for", tuple, kwargs, kwlist, 2, 1) == 0
         && PyArg_ParseTupleAndKeywords(tuple, kwargs, "O|O:shutdown_waits_for", kwlist,
                                        coro, loop);
    /* The objects parsed out are args' own, which outlive the tuple. */
    Py_XDECREF(tuple);
    Py_XDECREF(kwargs);
    return ok ? 0 : -1;
}

PyObject *
aiorun_shutdown_waits_for(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    aiorun_state *st = aiorun_get_state(module);
    PyObject *coro, *loop = Py_None;
    PyObject *call_args = NULL, *call_kwargs = NULL, *task = NULL;
    WaiterObject *waiter = NULL;

    if (nargs == 1 && kwnames == NULL) {
        coro = args[0];   /* the usual call, with nothing to check */
    }
    else if (parse_general_call(args, nargs, kwnames, &coro, &loop) < 0) {
        return NULL;
    }
    /* A coroutine, the usual case, needs no inspect.isawaitable(). */
    int is_coro = PyCoro_CheckExact(coro);
    PyObject *check = is_coro ? Py_NewRef(Py_True) : PyObject_CallOneArg(st->isawaitable, coro);
    int ok = check ? PyObject_IsTrue(check) : -1;
    Py_XDECREF(check);
    if (ok <= 0) {
        if (ok == 0) {
            PyErr_Format(PyExc_TypeError,
                         "shutdown_waits_for() argument 'coro' must be a coroutine "
                         "or awaitable, not %.200s", Py_TYPE(coro)->tp_name);
        }
        return NULL;
    }
    if (loop == Py_None) {
        loop = current_loop(st);
        if (loop == NULL) {
            return NULL;
        }
    }
    else {
        ok = PyObject_IsInstance(loop, st->AbstractEventLoop);
        if (ok <= 0) {
            if (ok == 0) {
                PyErr_Format(PyExc_TypeError,
                             "shutdown_waits_for() argument 'loop' must be an asyncio "
                             "event loop or None, not %.200s", Py_TYPE(loop)->tp_name);
            }
            return NULL;
        }
        Py_INCREF(loop);
    }

    /* The task copies the context it is made in: with the mark set there,
     * every task the protected work starts carries it too. */
    PyObject *token = PyContextVar_Set(st->protected_var, Py_True);
    if (token == NULL) {
        goto done;
    }
    if (is_coro) {
        /* What ensure_future(coro, loop=loop) does for a coroutine. */
        task = PyObject_CallMethodOneArg(loop, st->s_create_task, coro);
    }
    else {
        call_args = PyTuple_Pack(1, coro);
        call_kwargs = call_args ? Py_BuildValue("{OO}", st->s_loop, loop) : NULL;
        task = call_kwargs ? PyObject_Call(st->ensure_future, call_args, call_kwargs)
                           : NULL;
    }
    PyObject *exc = aiorun_take_error();
    if (aiorun_contextvar_reset(st->protected_var, token) < 0) {
        /* (MemoryError.)  A task nobody will know of is cancelled, and the
         * first error stays the one raised. */
        PyObject *later = aiorun_take_error();
        if (task != NULL) {
            PyObject *res = PyObject_CallMethodNoArgs(task, st->s_cancel);
            Py_XDECREF(res);
            PyErr_Clear();
            Py_CLEAR(task);
        }
        if (exc == NULL) {
            exc = later;
        }
        else {
            Py_XDECREF(later);
        }
    }
    Py_DECREF(token);
    if (exc != NULL) {
        aiorun_restore_error(exc);
    }
    /* The shutdown phase does not cancel a marked task.  One that cannot be
     * marked is cancelled: nobody would await it or know of it. */
    if (task == NULL) {
        goto done;
    }
    if (mark_protected(st, task) < 0) {
        PyObject *exc = aiorun_take_error();
        PyObject *res = PyObject_CallMethodNoArgs(task, st->s_cancel);
        Py_XDECREF(res);
        PyErr_Clear();
        if (exc != NULL) {
            aiorun_restore_error(exc);
        }
        goto done;
    }
    waiter = PyObject_GC_New(WaiterObject, (PyTypeObject *)st->WaiterType);
    if (waiter == NULL) {
        goto done;
    }
    waiter->task = Py_NewRef(task);
    waiter->loop = Py_NewRef(loop);
    waiter->wait = NULL;
    waiter->weakreflist = NULL;
    waiter->phase = WAITER_FRESH;
    PyObject_GC_Track(waiter);
done:
    Py_DECREF(loop);
    Py_XDECREF(call_args);
    Py_XDECREF(call_kwargs);
    Py_XDECREF(task);
    return (PyObject *)waiter;
}
