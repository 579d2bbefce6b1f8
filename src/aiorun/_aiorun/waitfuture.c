/* The future-like object a task awaiting shutdown_waits_for() waits on.
 *
 * It stands for "the protected task has ended", with one difference from
 * the task itself: cancelling it cancels only the wait, never the task.
 * An asyncio Task that awaits it registers its wake-up through
 * add_done_callback(); we pass that straight on to the protected task, so
 * the awaiting task resumes in the same turn of the loop in which the
 * protected one ends, as `await task` would, with no future in between.
 * cancel() takes the wake-up back from the protected task and schedules it
 * on the loop with this object cancelled, as a cancelled Future does.  So a
 * callback gets the protected task when it ends, or this object when the
 * wait was cancelled; asyncio's wake-up takes either.
 *
 * It speaks the protocol asyncio's Task (C or Python) expects of a future:
 * _asyncio_future_blocking, get_loop(), add_done_callback(fn, context=),
 * remove_done_callback(), cancel(msg=None), cancelled(), done(), result()
 * and exception(). */
#include "aiorun.h"

typedef struct {
    PyObject_HEAD
    PyObject *task;        /* the protected task */
    PyObject *loop;
    PyObject *fn;          /* the wake-up passed on to task, or NULL; its */
    PyObject *context;     /* context: kept inline, so that the usual single
                            * wake-up allocates nothing of ours */
    PyObject *more;        /* list of (fn, context) for any further ones */
    PyObject *cancel_msg;  /* once cancelled: the message, or None */
    int blocking;          /* _asyncio_future_blocking */
    int cancelled;
    int cancelling;        /* cancel() is scheduling the wake-ups */
    int closed;            /* cancelled by the waiter's close(): the awaiter
                            * resumes with RuntimeError, as at the await of
                            * a closed coroutine */
} WaitFutureObject;

static aiorun_state *
wait_state(WaitFutureObject *self)
{
    return aiorun_get_state_by_type(Py_TYPE(self));
}

/* args[0].name(*args[1:nargs], context=args[nargs]), or without the
 * keyword when the context is None: how asyncio hands callbacks on. */
static int
call_with_context(aiorun_state *st, PyObject *name, PyObject *const *args, size_t nargs)
{
    PyObject *kwnames = args[nargs] == Py_None ? NULL : st->kw_context;
    PyObject *res = PyObject_VectorcallMethod(name, args,
                                              nargs | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                              kwnames);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* task.add_done_callback(fn, context=context) */
static int
task_add_callback(aiorun_state *st, PyObject *task, PyObject *fn, PyObject *context)
{
    PyObject *args[3] = {task, fn, context};
    return call_with_context(st, st->s_add_done_callback, args, 2);
}

/* loop.call_soon(fn, self, context=context): what a done future does. */
static int
call_soon_with_self(WaitFutureObject *self, PyObject *fn, PyObject *context)
{
    PyObject *args[4] = {self->loop, fn, (PyObject *)self, context};
    return call_with_context(wait_state(self), wait_state(self)->s_call_soon, args, 3);
}

static int
take_back(WaitFutureObject *self, PyObject *fn)
{
    PyObject *res = PyObject_CallMethodOneArg(self->task,
                                              wait_state(self)->s_remove_done_callback, fn);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* Take every wake-up passed on back from the task and forget it.  Reports
 * a failure as unraisable: the caller has no way back by then. */
static void
take_back_all(WaitFutureObject *self)
{
    PyObject *fn = self->fn, *context = self->context, *more = self->more;
    self->fn = self->context = self->more = NULL;
    if (fn != NULL && take_back(self, fn) < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    for (Py_ssize_t i = 0; more != NULL && i < PyList_GET_SIZE(more); i++) {
        if (take_back(self, PyTuple_GET_ITEM(PyList_GET_ITEM(more, i), 0)) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    Py_XDECREF(fn);
    Py_XDECREF(context);
    Py_XDECREF(more);
}

void
aiorun_waitfuture_detach(PyObject *wait)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_BEGIN_CRITICAL_SECTION(wait);
    take_back_all((WaitFutureObject *)wait);
    Py_END_CRITICAL_SECTION();
    PyErr_Restore(type, value, tb);
}

int
aiorun_waitfuture_cancelled(PyObject *wait)
{
    int cancelled;
    AIORUN_LOCKED(wait, cancelled, ((WaitFutureObject *)wait)->cancelled);
    return cancelled;
}

int
aiorun_waitfuture_arm(PyObject *wait)
{
    WaitFutureObject *self = (WaitFutureObject *)wait;
    int armed;
    Py_BEGIN_CRITICAL_SECTION(wait);
    armed = !self->cancelled;
    if (armed) {
        self->blocking = 1;
    }
    Py_END_CRITICAL_SECTION();
    return armed;
}

PyObject *
aiorun_waitfuture_new(aiorun_state *st, PyObject *task, PyObject *loop)
{
    WaitFutureObject *self = PyObject_GC_New(WaitFutureObject,
                                             (PyTypeObject *)st->WaitFutureType);
    if (self == NULL) {
        return NULL;
    }
    self->task = Py_NewRef(task);
    self->loop = Py_NewRef(loop);
    self->fn = NULL;
    self->context = NULL;
    self->more = NULL;
    self->cancel_msg = NULL;
    self->blocking = 1;   /* made to be yielded */
    self->cancelled = 0;
    self->cancelling = 0;
    self->closed = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* Our record of one add_done_callback(): inline (self->fn) or `record` in
 * self->more.  Re-entrant code (a task class's add_done_callback(), an
 * __eq__, a cancel()) may have moved or dropped it meanwhile, so it is
 * looked up again, never remembered by position. */
static int
record_held(WaitFutureObject *self, PyObject *fn, PyObject *record)
{
    if (record == NULL) {
        return self->fn == fn;
    }
    for (Py_ssize_t i = 0; self->more != NULL && i < PyList_GET_SIZE(self->more); i++) {
        if (PyList_GET_ITEM(self->more, i) == record) {
            return 1;
        }
    }
    return 0;
}

static void
drop_record(WaitFutureObject *self, PyObject *fn, PyObject *record)
{
    if (record == NULL) {
        if (self->fn == fn) {
            PyObject *context = self->context;
            self->fn = self->context = NULL;
            Py_DECREF(fn);
            Py_XDECREF(context);
        }
        return;
    }
    for (Py_ssize_t i = 0; self->more != NULL && i < PyList_GET_SIZE(self->more); i++) {
        if (PyList_GET_ITEM(self->more, i) == record) {
            /* Our `record` reference keeps the tuple alive: no code runs. */
            (void)PyList_SetSlice(self->more, i, i + 1, NULL);
            return;
        }
    }
}

static PyObject *
wait_add_done_callback_impl(WaitFutureObject *self, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames)
{
    aiorun_state *st = wait_state(self);
    PyObject *fn = NULL, *context = Py_None, *record = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;

    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError,
                     "add_done_callback() takes 1 positional argument (%zd given)", nargs);
        return NULL;
    }
    fn = args[0];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (!PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, "context") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "add_done_callback() got an unexpected keyword argument '%S'",
                         key);
            return NULL;
        }
        context = args[nargs + i];
    }
    if (self->cancelled || self->cancelling) {
        /* Like a Future that is done: schedule the call now. */
        if (call_soon_with_self(self, fn, context) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    /* Recorded before the task gets it, so a cancel() that the call runs
     * schedules this one too. */
    Py_INCREF(fn);
    if (self->fn == NULL) {
        /* The usual case, one awaiting task: nothing to allocate here, so
         * nothing of ours can fail between asyncio and its wake-up. */
        self->fn = Py_NewRef(fn);
        self->context = Py_NewRef(context);
    }
    else {
        record = PyTuple_Pack(2, fn, context);
        if (record == NULL
            || (self->more == NULL && (self->more = PyList_New(0)) == NULL)
            || PyList_Append(self->more, record) < 0) {
            Py_XDECREF(record);
            Py_DECREF(fn);
            return NULL;
        }
    }
    PyObject *res = NULL;
    if (task_add_callback(st, self->task, fn, context) < 0) {
        /* Not passed on, so not ours to take back. */
        drop_record(self, fn, record);
    }
    else {
        res = Py_NewRef(Py_None);
        /* Gone already: a cancel() or remove_done_callback() ran during the
         * call, before the task had it; it must not wake anyone twice. */
        if (!record_held(self, fn, record) && take_back(self, fn) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    Py_XDECREF(record);
    Py_DECREF(fn);
    return res;
}

static PyObject *
wait_remove_done_callback_impl(WaitFutureObject *self, PyObject *fn)
{
    Py_ssize_t removed = 0;
    PyObject *records = NULL, *kept = NULL;
    /* Every comparison may run Python code (__eq__) that adds, removes or
     * cancels: compare our own references, and look at the fields again
     * after each call. */
    PyObject *ours = Py_XNewRef(self->fn);
    if (ours != NULL) {
        int same = PyObject_RichCompareBool(ours, fn, Py_EQ);
        if (same > 0 && self->fn == ours) {
            PyObject *context = self->context;
            self->fn = self->context = NULL;
            Py_DECREF(ours);   /* the field's reference; ours is still held */
            Py_XDECREF(context);
            removed++;
            same = take_back(self, ours);
        }
        Py_DECREF(ours);
        if (same < 0) {
            return NULL;
        }
    }
    records = Py_XNewRef(self->more);
    if (records == NULL) {
        return PyLong_FromSsize_t(removed);
    }
    if ((kept = PyList_New(0)) == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
        PyObject *record = Py_NewRef(PyList_GET_ITEM(records, i));
        PyObject *callback = PyTuple_GET_ITEM(record, 0);
        int same = PyObject_RichCompareBool(callback, fn, Py_EQ);
        if (same > 0) {
            same = take_back(self, callback) < 0 ? -1 : 1;
            removed++;
        }
        else if (same == 0) {
            same = PyList_Append(kept, record) < 0 ? -1 : 0;
        }
        Py_DECREF(record);
        if (same < 0) {
            goto error;
        }
    }
    /* Only if the list is still the wait's: a cancel() meanwhile took it. */
    if (self->more == records) {
        Py_SETREF(self->more, kept);
        kept = NULL;
    }
    Py_DECREF(records);
    Py_XDECREF(kept);
    return PyLong_FromSsize_t(removed);
error:
    Py_DECREF(records);
    Py_XDECREF(kept);
    return NULL;
}

/* 1 if the wait is over: cancelled, or the protected task has ended. */
static int
wait_is_done(WaitFutureObject *self)
{
    return self->cancelled ? 1 : aiorun_call_predicate(self->task, wait_state(self)->s_done);
}

static PyObject *
wait_cancel_impl(WaitFutureObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"msg", NULL};
    PyObject *msg = Py_None;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:cancel", kwlist, &msg)) {
        return NULL;
    }
    int done = self->cancelling ? 1 : wait_is_done(self);
    if (done != 0) {
        return done < 0 ? NULL : Py_NewRef(Py_False);
    }
    /* Schedule the wake-ups first: if the first fails, nothing has changed
     * and the task still wakes them when it ends; no wake-up is ever lost.
     * Our own references: call_soon() may run code that changes ours, and
     * `cancelling` turns away a cancel() or add_done_callback() it makes. */
    self->cancelling = 1;
    PyObject *fn = Py_XNewRef(self->fn), *context = Py_XNewRef(self->context);
    PyObject *more = Py_XNewRef(self->more);
    Py_ssize_t scheduled = 0;
    int rc = fn ? call_soon_with_self(self, fn, context) : 0;
    scheduled += fn != NULL && rc == 0;
    for (Py_ssize_t i = 0; rc == 0 && more != NULL && i < PyList_GET_SIZE(more); i++) {
        PyObject *record = Py_NewRef(PyList_GET_ITEM(more, i));
        rc = call_soon_with_self(self, PyTuple_GET_ITEM(record, 0),
                                 PyTuple_GET_ITEM(record, 1));
        scheduled += rc == 0;
        Py_DECREF(record);
    }
    self->cancelling = 0;
    if (rc < 0 && scheduled == 0) {
        Py_XDECREF(fn);
        Py_XDECREF(context);
        Py_XDECREF(more);
        return NULL;
    }
    self->cancelled = 1;
    Py_XSETREF(self->cancel_msg, Py_NewRef(msg));
    if (rc == 0) {
        Py_XDECREF(fn);
        Py_XDECREF(context);
        Py_XDECREF(more);
        take_back_all(self);
        Py_RETURN_TRUE;
    }
    /* Some were scheduled, then a call_soon() failed (MemoryError): those
     * see the wait cancelled, so the task must not wake them a second
     * time; the rest stay with the task, which wakes them when it ends.
     * The wait forgets them all. */
    PyObject *exc = aiorun_take_error();
    PyObject *old_fn = self->fn, *old_context = self->context, *old_more = self->more;
    self->fn = self->context = self->more = NULL;
    if (fn != NULL && scheduled > 0) {
        scheduled--;
        if (take_back(self, fn) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    for (Py_ssize_t i = 0; scheduled > 0 && more != NULL && i < PyList_GET_SIZE(more); i++) {
        PyObject *record = Py_NewRef(PyList_GET_ITEM(more, i));
        scheduled--;
        if (take_back(self, PyTuple_GET_ITEM(record, 0)) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        Py_DECREF(record);
    }
    Py_XDECREF(old_fn);
    Py_XDECREF(old_context);
    Py_XDECREF(old_more);
    Py_XDECREF(fn);
    Py_XDECREF(context);
    Py_XDECREF(more);
    if (exc != NULL) {
        aiorun_restore_error(exc);
    }
    return NULL;
}

void
aiorun_waitfuture_close(PyObject *wait)
{
    WaitFutureObject *self = (WaitFutureObject *)wait;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_BEGIN_CRITICAL_SECTION(wait);
    /* cancel()'s way: the wake-ups are scheduled, then taken back from the
     * task.  A wait cancelled already keeps its CancelledError; one whose
     * task has ended wakes its awaiter anyway, which then finds the waiter
     * closed.  If the wake-ups cannot be scheduled (the loop is closed),
     * they are taken back. */
    if (!self->cancelled && !self->cancelling) {
        self->closed = 1;
        PyObject *args = PyTuple_New(0);
        PyObject *res = args ? wait_cancel_impl(self, args, NULL) : NULL;
        Py_XDECREF(args);
        if (res != Py_True) {
            self->closed = 0;
        }
        if (res == NULL) {
            PyErr_Clear();
            take_back_all(self);
        }
        Py_XDECREF(res);
    }
    Py_END_CRITICAL_SECTION();
    PyErr_Restore(type, value, tb);
}

/* The protected task's answer to result() or exception(), or the
 * CancelledError (with its message) of a cancelled wait. */
static PyObject *
ask_task(WaitFutureObject *self, PyObject *method)
{
    aiorun_state *st = wait_state(self);
    if (!self->cancelled) {
        return PyObject_CallMethodNoArgs(self->task, method);
    }
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return NULL;
    }
    PyObject *exc = self->cancel_msg == Py_None
        ? PyObject_CallNoArgs(st->CancelledError)
        : PyObject_CallOneArg(st->CancelledError, self->cancel_msg);
    if (exc != NULL) {
        PyErr_SetObject(st->CancelledError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *
wait_result_impl(WaitFutureObject *self, PyObject *unused)
{
    (void)unused;
    return ask_task(self, wait_state(self)->s_result);
}

static PyObject *
wait_exception_impl(WaitFutureObject *self, PyObject *unused)
{
    (void)unused;
    return ask_task(self, wait_state(self)->s_exception);
}

static PyObject *
wait_done_impl(WaitFutureObject *self, PyObject *unused)
{
    (void)unused;
    int done = wait_is_done(self);
    return done < 0 ? NULL : PyBool_FromLong(done);
}

static PyObject *
wait_cancelled_impl(WaitFutureObject *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(self->cancelled && !self->closed);
}

static PyObject *
wait_get_loop(WaitFutureObject *self, PyObject *unused)
{
    (void)unused;
    return Py_NewRef(self->loop);
}

static PyObject *
wait_get_blocking_impl(WaitFutureObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->blocking);
}

static int
wait_set_blocking_impl(WaitFutureObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete _asyncio_future_blocking");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0) {
        return -1;
    }
    self->blocking = truth;
    return 0;
}

static PyObject *
wait_get_task(WaitFutureObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->task);
}

static PyObject *
wait_repr_impl(WaitFutureObject *self)
{
    return PyUnicode_FromFormat("<shutdown_waits_for wait%s on %R>",
                                self->cancelled ? " (cancelled)" : "", self->task);
}

/* ---- every way in holds a critical section on the wait (aiorun.h) ---- */

static PyObject *
wait_add_done_callback(WaitFutureObject *self, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames)
{
    PyObject *res;
    AIORUN_LOCKED(self, res, wait_add_done_callback_impl(self, args, nargs, kwnames));
    return res;
}

static PyObject *
wait_cancel(WaitFutureObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *res;
    AIORUN_LOCKED(self, res, wait_cancel_impl(self, args, kwargs));
    return res;
}

AIORUN_LOCKED_O(wait_remove_done_callback, wait_remove_done_callback_impl)
AIORUN_LOCKED_NOARGS(wait_result, wait_result_impl)
AIORUN_LOCKED_NOARGS(wait_exception, wait_exception_impl)
AIORUN_LOCKED_NOARGS(wait_done, wait_done_impl)
AIORUN_LOCKED_NOARGS(wait_cancelled, wait_cancelled_impl)

static PyObject *
wait_get_blocking(WaitFutureObject *self, void *closure)
{
    PyObject *res;
    AIORUN_LOCKED(self, res, wait_get_blocking_impl(self, closure));
    return res;
}

static int
wait_set_blocking(WaitFutureObject *self, PyObject *value, void *closure)
{
    int rc;
    AIORUN_LOCKED(self, rc, wait_set_blocking_impl(self, value, closure));
    return rc;
}

static PyObject *
wait_repr(WaitFutureObject *self)
{
    PyObject *res;
    AIORUN_LOCKED(self, res, wait_repr_impl(self));
    return res;
}

static int
wait_traverse(WaitFutureObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->task);
    Py_VISIT(self->loop);
    Py_VISIT(self->fn);
    Py_VISIT(self->context);
    Py_VISIT(self->more);
    Py_VISIT(self->cancel_msg);
    return 0;
}

static int
wait_clear(WaitFutureObject *self)
{
    Py_CLEAR(self->task);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->fn);
    Py_CLEAR(self->context);
    Py_CLEAR(self->more);
    Py_CLEAR(self->cancel_msg);
    return 0;
}

static void
wait_dealloc(WaitFutureObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)wait_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(type);
}

static PyMethodDef wait_methods[] = {
    {"add_done_callback", (PyCFunction)(void (*)(void))wait_add_done_callback,
     METH_FASTCALL | METH_KEYWORDS,
     "add_done_callback(fn, *, context=None): call fn(self) when the wait is over."},
    {"remove_done_callback", (PyCFunction)wait_remove_done_callback, METH_O,
     "remove_done_callback(fn) -> number of callbacks removed"},
    {"cancel", (PyCFunction)(void (*)(void))wait_cancel, METH_VARARGS | METH_KEYWORDS,
     "cancel(msg=None): end the wait only; the protected task runs on."},
    {"cancelled", (PyCFunction)wait_cancelled, METH_NOARGS, NULL},
    {"done", (PyCFunction)wait_done, METH_NOARGS, NULL},
    {"result", (PyCFunction)wait_result, METH_NOARGS,
     "The protected task's result, or CancelledError if the wait was cancelled."},
    {"exception", (PyCFunction)wait_exception, METH_NOARGS, NULL},
    {"get_loop", (PyCFunction)wait_get_loop, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef wait_getset[] = {
    {"_asyncio_future_blocking", (getter)wait_get_blocking, (setter)wait_set_blocking,
     "Set while a task is yielding this object, as on asyncio futures.", NULL},
    {"task", (getter)wait_get_task, NULL, "The protected task.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot wait_slots[] = {
    {Py_tp_new, aiorun_refuse_new},
    {Py_tp_dealloc, wait_dealloc},
    {Py_tp_traverse, wait_traverse},
    {Py_tp_clear, wait_clear},
    {Py_tp_repr, wait_repr},
    {Py_tp_methods, wait_methods},
    {Py_tp_getset, wait_getset},
    {0, NULL},
};

PyType_Spec aiorun_waitfuture_type_spec = {
    .name = "aiorun._aiorun.ShutdownWaitFuture",
    .basicsize = sizeof(WaitFutureObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = wait_slots,
};
