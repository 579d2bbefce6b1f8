/* stop_on_unhandled_errors and the main task.
 *
 * The exception handler keeps the exception to re-raise after the shutdown
 * and stops the loop.  The main task is watched by a done callback so that
 * its exception reaches the loop's exception handler as soon as it ends:
 * aiorun in Python left that to the garbage collector. */
#include "aiorun.h"

/* What `raise exc` would raise: exc itself, an instance of an exception
 * class, or the TypeError Python gives for anything else (a library that
 * passes a non-exception as context["exception"]). */
static PyObject *
as_exception(PyObject *exc)
{
    if (exc == Py_None || PyExceptionInstance_Check(exc)) {
        return Py_NewRef(exc);
    }
    if (PyExceptionClass_Check(exc)) {
        PyObject *made = PyObject_CallNoArgs(exc);
        if (made != NULL && !PyExceptionInstance_Check(made)) {
            PyErr_Format(PyExc_TypeError,
                         "calling %R should have returned an instance of "
                         "BaseException, not %.200s", exc, Py_TYPE(made)->tp_name);
            Py_CLEAR(made);
        }
        return made ? made : aiorun_take_error();
    }
    PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
    return aiorun_take_error();
}

/* context.get(key) as a new reference (None when missing). */
static PyObject *
context_get(PyObject *context, const char *key)
{
    if (PyDict_CheckExact(context)) {   /* a subclass's own get() is called */
        PyObject *value = PyDict_GetItemString(context, key);
        return Py_NewRef(value ? value : Py_None);
    }
    return PyObject_CallMethod(context, "get", "s", key);
}

PyObject *
aiorun_run_exception_handler(PyObject *self, PyObject *const *args,
                             Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    PyObject *exc = NULL, *message = NULL, *res = NULL;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "exception handler takes (loop, context), got %zd arguments",
                     nargs);
        return NULL;
    }
    PyObject *loop = args[0], *context = args[1];
    if (run->loop == NULL) {
        /* run() has returned: the loop's own handler takes over. */
        return PyObject_CallMethod(loop, "default_exception_handler", "O", context);
    }
    exc = context_get(context, "exception");
    if (exc == NULL) {
        goto done;
    }
    Py_SETREF(exc, as_exception(exc));
    if (exc == NULL) {
        goto done;
    }
    message = context_get(context, "message");
    if (message == NULL) {
        goto done;
    }
    /* The error rule (aiorun.h): until the loop has stopped, the latest
     * report with an exception is the one to re-raise; after, a report is
     * only logged, and kept only when nothing else is. */
    if (run->phase < PHASE_SHUTDOWN) {
        if (exc != Py_None) {
            Py_XSETREF(run->pending_exc, Py_NewRef(exc));
        }
        /* Stopped before the log line, so that a logging handler that
         * raises cannot keep it running.  Once the shutdown has begun the
         * loop runs only to finish it: stopping it then would abort it. */
        aiorun_run_request(run, CAUSE_UNHANDLED_ERROR, 0);
        res = PyObject_CallMethod(loop, "stop", NULL);
        if (res == NULL) {
            goto done;
        }
        Py_CLEAR(res);
    }
    else if (exc != Py_None && run->pending_exc == NULL) {
        run->pending_exc = Py_NewRef(exc);
    }
    if (aiorun_log_exc(run->state, LOG_ERROR,
                       "Unhandled exception; stopping loop: %r", message, exc) < 0) {
        goto done;
    }
    res = Py_NewRef(Py_None);
done:
    Py_XDECREF(exc);
    Py_XDECREF(message);
    return res;
}

PyObject *
aiorun_run_main_done(PyObject *self, PyObject *task)
{
    RunObject *run = (RunObject *)self;
    aiorun_state *st = run->state;
    PyObject *exc = NULL, *context = NULL, *res = NULL;

    if (run->loop == NULL) {
        Py_RETURN_NONE;   /* run() has returned; asyncio reports it */
    }
    /* Ours: the calls below run Python code, and run() may end meanwhile
     * (when this is called from another thread). */
    PyObject *loop = Py_NewRef(run->loop);
    int is_cancelled = aiorun_call_predicate(task, st->s_cancelled);
    if (is_cancelled != 0) {
        /* A CancelledError escaping the main coroutine is swallowed. */
        Py_DECREF(loop);
        return is_cancelled < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* Retrieving the exception also stops the task from reporting it a
     * second time when it is collected. */
    exc = PyObject_CallMethodNoArgs(task, st->s_exception);
    /* A KeyboardInterrupt out of the main coroutine has escaped the loop
     * too, and run() took it as a request to shut down ("Got
     * KeyboardInterrupt"), as the original does: it is not also an error
     * to re-raise. */
    if (exc == NULL || exc == Py_None
        || PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
        Py_DECREF(loop);
        Py_XDECREF(exc);
        return exc == NULL ? NULL : Py_NewRef(Py_None);
    }
    context = Py_BuildValue("{sssOsO}", "message", "Task exception was never retrieved",
                            "exception", exc, "future", task);
    if (context == NULL) {
        goto done;
    }
    res = PyObject_CallMethod(loop, "call_exception_handler", "O", context);
done:
    Py_DECREF(loop);
    Py_DECREF(exc);
    Py_XDECREF(context);
    return res;
}
