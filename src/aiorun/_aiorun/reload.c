/* Reloading on SIGHUP (run()'s reload_callback), for systemd's
 * Type=notify-reload: the callback runs on the loop while the app goes on
 * serving, and then systemd hears RELOADING=1 (stamped with MONOTONIC_USEC
 * at the start of the reload, after the SIGHUP) and READY=1 together.
 *
 * A failed reload (the callback raised) is logged with its traceback, and
 * the app serves on with its old state.  systemd 257 has no message that
 * fails a reload: READY=1 ends one successfully, and ERRNO= and STATUS=
 * only describe the service.  What fails it is its timeout
 * (TimeoutStartSec=), and only while the service has not said RELOADING=1:
 * after the timeout systemd goes back to waiting for as long as the last
 * word was RELOADING=1 (seen under 257.13: the timeout repeats, and
 * `systemctl reload` never returns).  So RELOADING=1 is said only with the
 * READY=1 of a reload that worked, and a failed one says only its STATUS=:
 * systemd ends the reload at its timeout with result "timeout", `systemctl
 * reload` fails, and the service stays up.
 *
 * One reload at a time: a SIGHUP during a reload asks for one more after
 * it, and any number of them ask for just one.  Once the shutdown has
 * begun, SIGHUP does nothing.  SIGHUP belongs to the process: only the run()
 * that owns it takes it (aiorun.h), and only when given a callback; the
 * handler is put back when run() returns (signals.c). */
#include "aiorun.h"

/* Hands the loop a reload to start.  Never raises (a signal handler's
 * caller); a failure is logged and the next SIGHUP tries again. */
static void
schedule_reload(RunObject *run)
{
    if (run->reload_scheduled || run->loop == NULL) {
        return;
    }
    run->reload_scheduled = 1;
    PyObject *start = aiorun_run_method(run, "_reload");
    PyObject *res = start ? PyObject_CallMethodOneArg(
        run->loop, run->state->s_call_soon_threadsafe, start) : NULL;
    Py_XDECREF(start);
    if (res == NULL) {
        run->reload_scheduled = 0;
        aiorun_log_current_error(run->state, "Could not schedule the reload; the next "
                                             "SIGHUP tries again");
        return;
    }
    Py_DECREF(res);
}

PyObject *
aiorun_run_on_reload_signal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    (void)args;
    (void)nargs;
    if (run->reload_callback == NULL || run->shutdown_requested
        || run->phase >= PHASE_SHUTDOWN) {
        Py_RETURN_NONE;
    }
    if (run->reloading || run->reload_scheduled || run->loop == NULL) {
        run->reload_again = 1;   /* one more after this one, however many come */
        Py_RETURN_NONE;
    }
    schedule_reload(run);
    Py_RETURN_NONE;
}

void
aiorun_reload_loop_ready(RunObject *run)
{
    if (run->reload_again && !run->reloading) {
        run->reload_again = 0;
        schedule_reload(run);
    }
}

/* The reload is over: exc is NULL when it succeeded.  Tells the supervisor
 * and the log, then starts the reload a SIGHUP asked for meanwhile. */
static void
reload_finished(RunObject *run, PyObject *exc)
{
    aiorun_state *st = run->state;
    run->reloading = 0;
    if (run->phase >= PHASE_SHUTDOWN) {
        /* The shutdown cancelled it: no READY=1, and nothing failed. */
        if (aiorun_log(st, LOG_INFO, "Reload cut short by the shutdown.") < 0) {
            PyErr_WriteUnraisable((PyObject *)run);
        }
        return;
    }
    int rc = exc == NULL
        ? aiorun_log(st, LOG_INFO, "Reload done.")
        : aiorun_log_exc(st, LOG_ERROR,
                         "Reload failed; serving on with the state from before it", NULL,
                         exc);
    if (rc < 0) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    aiorun_notify_reloaded(run, exc);
    if (run->reload_again && run->phase == PHASE_RUNNING) {
        run->reload_again = 0;
        schedule_reload(run);
    }
}

/* The exception set now, normalized with its traceback, as a new
 * reference; the error indicator is cleared. */
static PyObject *
fetch_exception(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

PyObject *
aiorun_run_reload(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    aiorun_state *st = run->state;
    (void)unused;
    run->reload_scheduled = 0;
    if (run->reload_callback == NULL || run->reloading || run->phase != PHASE_RUNNING
        || run->shutdown_requested) {
        Py_RETURN_NONE;
    }
    run->reloading = 1;
    run->reload_again = 0;
    aiorun_notify_reloading(run);
    if (aiorun_log(st, LOG_INFO, "Reloading (SIGHUP).") < 0) {
        PyObject *exc = fetch_exception();
        reload_finished(run, exc);
        Py_XDECREF(exc);
        Py_RETURN_NONE;
    }
    /* Held: the callback may be anything, and run() may be ending. */
    PyObject *callback = Py_NewRef(run->reload_callback);
    PyObject *res = PyObject_CallNoArgs(callback);
    Py_DECREF(callback);
    int awaitable = res == NULL ? -1 : 0;
    if (res != NULL && res != Py_None) {
        PyObject *check = PyObject_CallOneArg(st->isawaitable, res);
        awaitable = check ? PyObject_IsTrue(check) : -1;
        Py_XDECREF(check);
    }
    PyObject *task = NULL;
    if (awaitable == 1) {
        PyObject *args = PyTuple_Pack(1, res);
        PyObject *kwargs = args ? Py_BuildValue("{sO}", "loop", run->loop) : NULL;
        task = kwargs ? PyObject_Call(st->ensure_future, args, kwargs) : NULL;
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
        PyObject *done = task ? aiorun_run_method(run, "_reload_done") : NULL;
        PyObject *added = done ? PyObject_CallMethodOneArg(task, st->s_add_done_callback,
                                                           done) : NULL;
        Py_XDECREF(done);
        if (added == NULL) {
            Py_CLEAR(task);
        }
        Py_XDECREF(added);
    }
    Py_XDECREF(res);
    if (awaitable == 1 && task != NULL) {
        Py_XSETREF(run->reload_task, task);
        Py_RETURN_NONE;   /* _reload_done finishes it */
    }
    PyObject *exc = awaitable < 0 || PyErr_Occurred() ? fetch_exception() : NULL;
    reload_finished(run, exc);
    Py_XDECREF(exc);
    Py_RETURN_NONE;
}

PyObject *
aiorun_run_reload_done(PyObject *self, PyObject *task)
{
    RunObject *run = (RunObject *)self;
    aiorun_state *st = run->state;
    if (task != run->reload_task) {
        Py_RETURN_NONE;   /* not the reload under way (run() ended, or a stray call) */
    }
    Py_INCREF(task);
    Py_CLEAR(run->reload_task);
    PyObject *exc = NULL;
    int cancelled = aiorun_call_predicate(task, st->s_cancelled);
    if (cancelled == 1) {
        exc = PyObject_CallNoArgs(st->CancelledError);
    }
    else if (cancelled == 0) {
        exc = PyObject_CallMethodNoArgs(task, st->s_exception);
        if (exc == Py_None) {
            Py_CLEAR(exc);
        }
        else if (exc != NULL && !PyExceptionInstance_Check(exc)) {
            Py_SETREF(exc, PyObject_CallFunction(PyExc_TypeError, "s",
                                                 "the reload task's exception() is not "
                                                 "an exception"));
        }
    }
    if (PyErr_Occurred()) {
        Py_XDECREF(exc);
        exc = fetch_exception();
    }
    Py_DECREF(task);
    reload_finished(run, exc);
    Py_XDECREF(exc);
    Py_RETURN_NONE;
}
