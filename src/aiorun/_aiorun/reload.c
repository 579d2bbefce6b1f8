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

/* The reload is over: exc is NULL when it succeeded.  Tells the log and
 * (while the app serves) the supervisor, then starts the reload a SIGHUP
 * asked for meanwhile. */
static void
reload_finished(RunObject *run, PyObject *exc)
{
    aiorun_state *st = run->state;
    run->reloading = 0;
    int serving = run->phase == PHASE_RUNNING && !run->shutdown_requested;
    int cancelled = exc != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)st->CancelledError);
    if (exc != NULL && !cancelled
        && !PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_Exception)) {
        return;   /* SystemExit, KeyboardInterrupt: run() reports them itself */
    }
    int rc = exc == NULL ? aiorun_log(st, LOG_INFO, "Reload done.")
        : cancelled && !serving ? aiorun_log(st, LOG_INFO,
                                             "Reload cut short by the shutdown.")
        : aiorun_log_exc(st, LOG_ERROR,
                         serving ? "Reload failed; serving on with the state from "
                                   "before it"
                                 : "Reload failed during the shutdown",
                         NULL, exc);
    if (rc < 0) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    if (!serving) {
        return;   /* the service is stopping: no READY=1, no more reloads */
    }
    aiorun_notify_reloaded(run, exc);
    if (run->reload_again) {
        run->reload_again = 0;
        schedule_reload(run);
    }
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
        PyObject *exc = aiorun_take_error();
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
    if (awaitable < 0 && !PyErr_ExceptionMatches(PyExc_Exception)) {
        /* SystemExit, KeyboardInterrupt: not a failed reload, but the
         * app's request, which run() handles as it does from any callback. */
        run->reloading = 0;
        Py_XDECREF(res);
        return NULL;
    }
    if (awaitable == 1) {
        PyObject *args = PyTuple_Pack(1, res);
        PyObject *kwargs = args ? Py_BuildValue("{sO}", "loop", run->loop) : NULL;
        PyObject *task = kwargs ? PyObject_Call(st->ensure_future, args, kwargs) : NULL;
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
        Py_DECREF(res);
        if (task != NULL) {
            /* Known as the reload before its done callback can run. */
            Py_XSETREF(run->reload_task, task);
            PyObject *done = aiorun_run_method(run, "_reload_done");
            PyObject *added = done ? PyObject_CallMethodOneArg(
                task, st->s_add_done_callback, done) : NULL;
            Py_XDECREF(done);
            if (added != NULL) {
                Py_DECREF(added);
                Py_RETURN_NONE;   /* _reload_done finishes it */
            }
            /* Nothing will say when it ends: stop it, and fail the reload. */
            PyObject *exc = aiorun_take_error();
            PyObject *cancel = PyObject_CallMethodNoArgs(task, st->s_cancel);
            if (cancel == NULL) {
                PyErr_WriteUnraisable(task);
            }
            Py_XDECREF(cancel);
            if (run->reload_task == task) {
                Py_CLEAR(run->reload_task);
            }
            reload_finished(run, exc);
            Py_XDECREF(exc);
            Py_RETURN_NONE;
        }
        res = NULL;
    }
    Py_XDECREF(res);
    PyObject *exc = PyErr_Occurred() ? aiorun_take_error() : NULL;
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
        exc = aiorun_take_error();
    }
    Py_DECREF(task);
    reload_finished(run, exc);
    Py_XDECREF(exc);
    Py_RETURN_NONE;
}
