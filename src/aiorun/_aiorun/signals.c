/* Taking over SIGINT and SIGTERM (Windows: SIGINT and SIGBREAK) for the
 * duration of run(), and giving them back.
 *
 * The handler is installed through the signal module, not sigaction(): the
 * C-level handler stays CPython's own (it sets a flag and writes the wakeup
 * fd, both async-signal-safe), signal.getsignal() stays truthful, and our
 * code runs later on the main thread between bytecodes, where calling
 * Python is safe.  So no static state is needed here at all.
 *
 * The handler stays installed until run() returns and acts only on the
 * first signal: later ones are ignored, so a burst of signals cannot run
 * the shutdown handler twice or disturb the shutdown. */
#include "aiorun.h"

#include <signal.h>

static const int takeover_signals[] = {
#ifdef MS_WINDOWS
    SIGINT, SIGBREAK,
#else
    SIGINT, SIGTERM,
#endif
};
#define N_TAKEOVER_SIGNALS (sizeof(takeover_signals) / sizeof(takeover_signals[0]))

/* signal.signal(signum, handler); returns the previous handler. */
static PyObject *
set_handler(aiorun_state *st, int signum, PyObject *handler)
{
    return PyObject_CallFunction(st->signal_signal, "iO", signum, handler);
}

/* Put back every handler saved so far, newest first.  Errors are reported
 * as unraisable: this runs on the way out, often with an exception set. */
static void
put_back_saved(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *saved = run->saved_handlers;
    if (saved == NULL) {
        return;
    }
    for (Py_ssize_t i = PyList_GET_SIZE(saved) - 1; i >= 0; i--) {
        PyObject *entry = PyList_GET_ITEM(saved, i);
        int signum = (int)PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
        PyObject *previous = PyTuple_GET_ITEM(entry, 1);
        /* None means the handler was not set from Python: the best we can
         * give back is the default disposition. */
        PyObject *res = set_handler(st, signum,
                                    previous == Py_None ? st->sig_dfl : previous);
        if (res == NULL) {
            PyErr_WriteUnraisable((PyObject *)run);
        }
        Py_XDECREF(res);
    }
    Py_CLEAR(run->saved_handlers);
}

int
aiorun_signals_take_over(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *handler = aiorun_run_method(run, "_on_signal");
    if (handler == NULL) {
        return -1;
    }
    run->saved_handlers = PyList_New(0);
    if (run->saved_handlers == NULL) {
        Py_DECREF(handler);
        return -1;
    }
    for (size_t i = 0; i < N_TAKEOVER_SIGNALS; i++) {
        PyObject *previous = set_handler(st, takeover_signals[i], handler);
        if (previous == NULL) {
            goto fail;
        }
        PyObject *entry = Py_BuildValue("(iN)", takeover_signals[i], previous);
        if (entry == NULL) {
            goto fail;
        }
        int rc = PyList_Append(run->saved_handlers, entry);
        Py_DECREF(entry);
        if (rc < 0) {
            goto fail;
        }
    }
    Py_DECREF(handler);
    return 0;
fail:
    Py_DECREF(handler);
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        put_back_saved(run);
        PyErr_Restore(type, value, tb);
    }
    return -1;
}

/* Ask the loop to call shutdown_handler(loop) on its own thread.  Never
 * raises: an exception escaping a signal handler would surface at a random
 * place in the application. */
static void
schedule_shutdown_handler(RunObject *run)
{
    PyObject *call = aiorun_run_method(run, "_call_shutdown_handler");
    PyObject *res = call ? PyObject_CallMethodOneArg(
        run->loop, run->state->s_call_soon_threadsafe, call) : NULL;
    Py_XDECREF(call);
    if (res == NULL) {
        aiorun_log_current_error(run->state,
                                 "Could not schedule the shutdown handler");
        return;
    }
    Py_DECREF(res);
}

/* Runs on the loop's thread.  A shutdown that began some other way in the
 * meantime (loop.stop(), an unhandled error) makes the handler moot:
 * calling it then would stop the loop in the middle of the shutdown. */
PyObject *
aiorun_run_call_shutdown_handler(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    if (run->phase != PHASE_RUNNING) {
        Py_RETURN_NONE;
    }
    aiorun_watchdog_stage(run, STAGE_HANDLER);
    return PyObject_CallOneArg(run->shutdown_handler, run->loop);
}

PyObject *
aiorun_run_on_signal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    (void)args;
    (void)nargs;
    if (run->shutdown_requested || run->phase >= PHASE_SHUTDOWN) {
        Py_RETURN_NONE;  /* the shutdown is already on its way */
    }
    run->shutdown_requested = 1;
    /* For a signal that came before the watchdog's own handler was in. */
    aiorun_watchdog_request(run, REQUEST_SIGNAL);
    if (run->loop != NULL) {
        schedule_shutdown_handler(run);
    }
    /* Without a loop yet, aiorun_signals_loop_ready() schedules it. */
    Py_RETURN_NONE;
}

void
aiorun_signals_loop_ready(RunObject *run)
{
    if (run->shutdown_requested) {
        schedule_shutdown_handler(run);
    }
}

void
aiorun_signals_restore(RunObject *run)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    /* Signals that arrived during run() but whose Python-level handlers
     * have not run yet would otherwise reach the restored handlers (a late
     * KeyboardInterrupt after a clean shutdown).  Let ours absorb them. */
    if (PyErr_CheckSignals() < 0) {
        if (type == NULL) {
            PyErr_Fetch(&type, &value, &tb);
        }
        else {
            PyErr_WriteUnraisable((PyObject *)run);
        }
    }
    put_back_saved(run);
    PyErr_Restore(type, value, tb);
}

#ifdef MS_WINDOWS
/* The proactor loop can sit in a wait that Ctrl-C does not interrupt; a
 * timer every 0.1 s gives the interpreter a chance to run signal handlers. */
PyObject *
aiorun_run_windows_wakeup(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    if (run->phase >= PHASE_DONE || run->loop == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *again = aiorun_run_method(run, "_windows_wakeup");
    if (again == NULL) {
        return NULL;
    }
    PyObject *handle = PyObject_CallMethod(run->loop, "call_later", "dO", 0.1, again);
    Py_DECREF(again);
    if (handle == NULL) {
        return NULL;
    }
    Py_DECREF(handle);
    Py_RETURN_NONE;
}
#endif
