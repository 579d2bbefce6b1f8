/* How the app learns of the shutdown: shutdown_event() is set as it
 * begins, and every cancel says why it began.
 *
 * The first request counts: a signal, loop.stop(), an unhandled error, or
 * a KeyboardInterrupt out of the loop.  Every task the shutdown cancels
 * gets the cause as its cancel message, "aiorun shutdown: SIGTERM", which
 * asyncio passes on as CancelledError.args[0].  The message is an instance
 * of a str subclass of ours, so cancelled_by_shutdown() tells it apart
 * from any string an app may pass to cancel() itself. */
#include "aiorun.h"

#define MESSAGE_PREFIX "aiorun shutdown: "

void
aiorun_run_request(RunObject *run, aiorun_cause cause, int signum)
{
    aiorun_report_requested(run);
    if (run->cause == CAUSE_NONE) {
        run->cause = cause;
        run->cause_signum = signum;
    }
    aiorun_health_stopping(run);   /* /readyz 503 before drain_delay */
    /* The watchdog only tells signals, loop.stop() and errors apart. */
    aiorun_watchdog_request(run, cause == CAUSE_SIGNAL ? REQUEST_SIGNAL
                                 : cause == CAUSE_UNHANDLED_ERROR
                                     ? REQUEST_UNHANDLED_ERROR
                                     : REQUEST_LOOP_STOPPED);
}

static PyObject *
cause_text(RunObject *run)
{
    switch (run->cause) {
    case CAUSE_SIGNAL:
        switch (run->cause_signum) {
        case SIGINT:
            return PyUnicode_FromString("SIGINT");
        case SIGTERM:
            return PyUnicode_FromString("SIGTERM");
#ifdef SIGBREAK
        case SIGBREAK:
            return PyUnicode_FromString("SIGBREAK");
#endif
        default:
            return PyUnicode_FromFormat("signal %d", run->cause_signum);
        }
    case CAUSE_UNHANDLED_ERROR:
        return PyUnicode_FromString("unhandled error");
    case CAUSE_KEYBOARD_INTERRUPT:
        return PyUnicode_FromString("KeyboardInterrupt");
    default:
        return PyUnicode_FromString("loop stopped");
    }
}

PyObject *
aiorun_shutdown_message(RunObject *run)
{
    PyObject *cause = cause_text(run);
    if (cause == NULL) {
        return NULL;
    }
    PyObject *text = PyUnicode_FromFormat(MESSAGE_PREFIX "%U", cause);
    Py_DECREF(cause);
    if (text == NULL) {
        return NULL;
    }
    PyObject *message = PyObject_CallOneArg(run->state->ShutdownMessageType, text);
    Py_DECREF(text);
    return message;
}

PyObject *
aiorun_cancelled_by_shutdown(PyObject *module, PyObject *exc)
{
    aiorun_state *st = aiorun_get_state(module);
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_Format(PyExc_TypeError,
                     "cancelled_by_shutdown() argument 'exc' must be an exception, "
                     "not %.200s", Py_TYPE(exc)->tp_name);
        return NULL;
    }
    int is_cancel = PyObject_IsInstance(exc, st->CancelledError);
    if (is_cancel <= 0) {
        return is_cancel < 0 ? NULL : Py_NewRef(Py_False);
    }
    PyObject *args = PyObject_GetAttrString(exc, "args");
    if (args == NULL) {
        return NULL;
    }
    int ours = PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 0
        && Py_IS_TYPE(PyTuple_GET_ITEM(args, 0),
                      (PyTypeObject *)st->ShutdownMessageType);
    Py_DECREF(args);
    return Py_NewRef(ours ? Py_True : Py_False);
}

/* The message type holds no references, so it needs no GC; its dealloc
 * only adds what every heap type's instances owe: the type's reference. */
static void
message_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyUnicode_Type.tp_dealloc(self);
    Py_DECREF(type);
}

/* Pickled as the plain str it reads: the type is private, and an
 * exception carrying it must still cross a multiprocessing.Queue or come
 * back from a process pool. */
static PyObject *
message_reduce(PyObject *self, PyObject *unused)
{
    (void)unused;
    PyObject *text = PyUnicode_FromObject(self);   /* an exact str copy */
    return text ? Py_BuildValue("(O(N))", (PyObject *)&PyUnicode_Type, text) : NULL;
}

static PyMethodDef message_methods[] = {
    {"__reduce__", message_reduce, METH_NOARGS,
     "Pickles as the str it reads."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot message_slots[] = {
    {Py_tp_dealloc, message_dealloc},
    {Py_tp_methods, message_methods},
    {Py_tp_doc, "The cancel message of a task cancelled by aiorun's shutdown: a str "
                "naming the cause."},
    {0, NULL},
};

PyType_Spec aiorun_message_type_spec = {
    .name = "aiorun._aiorun.ShutdownMessage",
    .basicsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = message_slots,
};

/* ---- shutdown_event() ---- */

/* A new asyncio.Event for loop.  Until 3.10 an Event binds at creation to
 * get_event_loop() of the calling thread, which on another thread than the
 * loop's is none ("There is no current event loop") or the wrong one: it is
 * made with loop as this thread's running loop for that moment, as it is
 * on the loop's own thread (Event(loop=...) would warn). */
static PyObject *
new_event(aiorun_state *st, PyObject *loop)
{
#if PY_VERSION_HEX < 0x030A0000
    if (loop == NULL) {
        return PyObject_CallNoArgs(st->Event);
    }
    /* Ours: the calls below run Python code, and run() may end meanwhile. */
    Py_INCREF(loop);
    PyObject *previous = PyObject_CallNoArgs(st->get_running_loop);
    if (previous == NULL || previous == loop) {
        PyObject *same = previous ? PyObject_CallNoArgs(st->Event) : NULL;
        Py_XDECREF(previous);
        Py_DECREF(loop);
        return same;
    }
    PyObject *event = NULL;
    PyObject *res = PyObject_CallOneArg(st->set_running_loop, loop);
    if (res != NULL) {
        Py_DECREF(res);
        event = PyObject_CallNoArgs(st->Event);
        /* Put back even when Event() failed; its error stays the one set. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        res = PyObject_CallOneArg(st->set_running_loop, previous);
        if (res == NULL) {
            Py_CLEAR(event);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        else {
            Py_DECREF(res);
            PyErr_Restore(type, value, tb);
        }
    }
    Py_DECREF(previous);
    Py_DECREF(loop);
    return event;
#else
    (void)loop;
    return PyObject_CallNoArgs(st->Event);
#endif
}

/* The event of `run`, made on the first request.  Called under the Run's
 * critical section: the loop's thread and others may ask at once. */
static PyObject *
run_shutdown_event(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *event = NULL;
    if (run->shutdown_event == NULL) {
        event = new_event(st, run->loop);
        if (event == NULL) {
            goto done;
        }
        /* Another caller may have made one meanwhile: theirs stays. */
        if (run->shutdown_event == NULL) {
            run->shutdown_event = Py_NewRef(event);
            if (run->shutdown_began) {
                PyObject *res = PyObject_CallMethod(event, "set", NULL);
                if (res == NULL) {
                    Py_CLEAR(event);
                    goto done;
                }
                Py_DECREF(res);
            }
        }
        Py_CLEAR(event);
    }
    event = run->loop == NULL ? NULL : Py_XNewRef(run->shutdown_event);
    if (event == NULL) {
        /* The run() ended meanwhile (asked from another thread). */
        PyErr_SetString(PyExc_RuntimeError, "shutdown_event(): the run() of that loop "
                        "has ended");
    }
done:
    return event;
}

/* With no running loop: the run() of this thread whose shutdown is under
 * way, where a plain shutdown_callback runs while the loop is stopped (the
 * innermost, if one is nested in another's callback).  A new reference,
 * or NULL (an exception set only for an error). */
static PyObject *
shutting_down_here(aiorun_state *st)
{
    /* A copy: other threads' run()s come and go in the dict. */
    PyObject *runs = PyDict_Values(st->runs);
    if (runs == NULL) {
        return NULL;
    }
    unsigned long here = aiorun_thread_ident();
    PyObject *found = NULL;
    for (Py_ssize_t i = PyList_GET_SIZE(runs) - 1; i >= 0 && found == NULL; i--) {
        RunObject *run = (RunObject *)PyList_GET_ITEM(runs, i);
        /* thread is set before the run() is in the dict and never again;
         * phase is read only for this thread's own run()s. */
        if (run->thread == here && run->phase == PHASE_SHUTDOWN) {
            found = Py_NewRef((PyObject *)run);
        }
    }
    Py_DECREF(runs);
    return found;
}

PyObject *
aiorun_shutdown_event(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"loop", NULL};
    aiorun_state *st = aiorun_get_state(module);
    PyObject *loop = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:shutdown_event", kwlist, &loop)) {
        return NULL;
    }
    if (loop == Py_None) {
        loop = PyObject_CallNoArgs(st->get_running_loop);
        if (loop == NULL) {
            return NULL;
        }
    }
    else {
        Py_INCREF(loop);
    }
    /* Our own reference at once: Event() below runs Python code, during
     * which the run() that owns it may end (called from another thread). */
    PyObject *found = NULL;
    if (loop != Py_None) {
        (void)PyDict_GetItemRef(st->runs, loop, &found);
    }
    else {
        found = shutting_down_here(st);
    }
    Py_DECREF(loop);
    if (found == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError,
                            "shutdown_event() must be called from code running in "
                            "the event loop of aiorun.run() or in its "
                            "shutdown_callback, or be given that loop");
        }
        return NULL;
    }
    RunObject *run = (RunObject *)found;
    PyObject *event;
    AIORUN_LOCKED(run, event, run_shutdown_event(run));
    Py_DECREF(run);
    return event;
}

static int
begin_shutdown(RunObject *run)
{
    if (run->shutdown_began) {
        return 0;
    }
    run->shutdown_began = 1;
    PyObject *event = Py_XNewRef(run->shutdown_event);
    if (event == NULL) {
        return 0;
    }
    PyObject *res = PyObject_CallMethod(event, "set", NULL);
    Py_DECREF(event);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* Under the Run's critical section: shutdown_event() on another thread
 * reads shutdown_began and sets shutdown_event. */
int
aiorun_run_begin_shutdown(RunObject *run)
{
    int rc;
    AIORUN_LOCKED(run, rc, begin_shutdown(run));
    return rc;
}
