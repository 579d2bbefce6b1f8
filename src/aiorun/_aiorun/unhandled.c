/* stop_on_unhandled_errors and the main task.
 *
 * The exception handler keeps the exception to re-raise after the shutdown
 * and stops the loop.  The main task is watched by a done callback so that
 * its exception reaches the loop's exception handler as soon as it ends:
 * aiorun in Python left that to the garbage collector. */
#include "aiorun.h"

/* context.get(key) as a new reference (None when missing). */
static PyObject *
context_get(PyObject *context, const char *key)
{
    if (PyDict_Check(context)) {
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
    exc = context_get(context, "exception");
    if (exc == NULL) {
        goto done;
    }
    message = context_get(context, "message");
    if (message == NULL) {
        goto done;
    }
    /* The latest report wins, as in aiorun; a report without an exception
     * leaves nothing to re-raise. */
    Py_XSETREF(run->pending_exc, exc == Py_None ? NULL : Py_NewRef(exc));
    if (aiorun_log_exc(run->state, LOG_ERROR,
                       "Unhandled exception; stopping loop: %r", message, exc) < 0) {
        goto done;
    }
    /* Once the shutdown has begun the loop runs only to finish it; stopping
     * it then would abort the shutdown half-way. */
    if (run->phase < PHASE_SHUTDOWN) {
        aiorun_run_request(run, CAUSE_UNHANDLED_ERROR, 0);
        res = PyObject_CallMethod(loop, "stop", NULL);
        if (res == NULL) {
            goto done;
        }
        Py_DECREF(res);
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

    int is_cancelled = aiorun_call_predicate(task, st->s_cancelled);
    if (is_cancelled != 0) {
        /* A CancelledError escaping the main coroutine is swallowed. */
        return is_cancelled < 0 ? NULL : Py_NewRef(Py_None);
    }
    /* Retrieving the exception also stops the task from reporting it a
     * second time when it is collected. */
    exc = PyObject_CallMethodNoArgs(task, st->s_exception);
    if (exc == NULL) {
        return NULL;
    }
    if (exc == Py_None) {
        Py_DECREF(exc);
        Py_RETURN_NONE;
    }
    context = Py_BuildValue("{sssOsO}", "message", "Task exception was never retrieved",
                            "exception", exc, "future", task);
    if (context == NULL) {
        goto done;
    }
    res = PyObject_CallMethod(run->loop, "call_exception_handler", "O", context);
done:
    Py_DECREF(exc);
    Py_XDECREF(context);
    return res;
}
