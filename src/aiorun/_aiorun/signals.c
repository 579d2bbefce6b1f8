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
 * the shutdown handler twice or disturb the shutdown.
 *
 * Both swaps happen with the two signals blocked in this thread (run()
 * holds them from its first instruction until the takeover is done).
 * signal.signal() runs the pending Python handlers before it swaps, so
 * without the block a signal landing just before a swap would reach the
 * old handler (a KeyboardInterrupt out of run(), or death by SIGTERM),
 * and one landing between that check and the swap would be dropped as
 * "ignored due to race condition".  Blocked, it waits in the kernel and
 * goes to whichever handler is in place when the block ends. */
#include "aiorun.h"

#include <signal.h>
#ifndef MS_WINDOWS
#include <fcntl.h>
#include <unistd.h>
#endif

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
    /* Our own list: run->saved_handlers is only emptied after the loop. */
    for (Py_ssize_t i = PyList_GET_SIZE(saved) - 1; i >= 0; i--) {
        /* Ours: set_handler() runs pending Python handlers. */
        PyObject *entry = Py_NewRef(PyList_GET_ITEM(saved, i));
        int signum = (int)PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
        PyObject *previous = PyTuple_GET_ITEM(entry, 1);
        /* None means the handler was not set from Python: the best we can
         * give back is the default disposition. */
        PyObject *handler = previous == Py_None ? st->sig_dfl : previous;
        PyObject *res = set_handler(st, signum, handler);
        if (res == NULL) {
            /* signal.signal() runs pending Python handlers first, and one of
             * them may have raised: report it and swap again, or ours would
             * stay for good. */
            PyErr_WriteUnraisable((PyObject *)run);
            res = set_handler(st, signum, handler);
            if (res == NULL) {
                PyErr_WriteUnraisable((PyObject *)run);
            }
        }
        Py_XDECREF(res);
        Py_DECREF(entry);
    }
    Py_CLEAR(run->saved_handlers);
}

int
aiorun_signals_take_over(RunObject *run)
{
    aiorun_state *st = run->state;
    if (!run->owns_process) {
        return 0;   /* the owner's, or signal.signal() would refuse (aiorun.h) */
    }
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
#ifndef MS_WINDOWS
    if (run->reload_callback != NULL) {
        Py_SETREF(handler, aiorun_run_method(run, "_on_reload_signal"));
        PyObject *previous = handler ? set_handler(st, SIGHUP, handler) : NULL;
        PyObject *entry = previous ? Py_BuildValue("(iN)", SIGHUP, previous) : NULL;
        if (entry == NULL || PyList_Append(run->saved_handlers, entry) < 0) {
            Py_XDECREF(entry);
            goto fail;
        }
        Py_DECREF(entry);
    }
#endif
    Py_DECREF(handler);
    return 0;
fail:
    Py_XDECREF(handler);
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        put_back_saved(run);
        PyErr_Restore(type, value, tb);
    }
    return -1;
}

/* A request that failed on its way (MemoryError) must not swallow the
 * ones after it: the next SIGINT/SIGTERM tries again. */
static void
allow_another_request(RunObject *run)
{
    run->shutdown_requested = 0;
    run->handler_scheduled = 0;
}

/* Ask the loop to call shutdown_handler(loop) on its own thread.  Never
 * raises: an exception escaping a signal handler would surface at a random
 * place in the application. */
static void
schedule_shutdown_handler(RunObject *run)
{
    /* Once only: the loop can become ready while the first signal's
     * handler is running, and both would schedule it. */
    if (run->handler_scheduled) {
        return;
    }
    run->handler_scheduled = 1;
    PyObject *call = aiorun_run_method(run, "_call_shutdown_handler");
    PyObject *res = call ? PyObject_CallMethodOneArg(
        run->loop, run->state->s_call_soon_threadsafe, call) : NULL;
    Py_XDECREF(call);
    if (res == NULL) {
        allow_another_request(run);
        aiorun_log_current_error(run->state,
                                 "Could not schedule the shutdown handler; "
                                 "the next signal tries again");
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
    aiorun_run_stage(run, STAGE_HANDLER);
    PyObject *res = PyObject_CallOneArg(run->shutdown_handler, run->loop);
    if (res == NULL) {
        allow_another_request(run);   /* the loop logs the error */
    }
    return res;
}

PyObject *
aiorun_run_on_signal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    if (run->shutdown_requested || run->phase >= PHASE_SHUTDOWN) {
        Py_RETURN_NONE;  /* the shutdown is already on its way */
    }
    run->shutdown_requested = 1;
    long signum = nargs > 0 && PyLong_Check(args[0]) ? PyLong_AsLong(args[0]) : 0;
    if (signum == -1 && PyErr_Occurred()) {
        PyErr_Clear();   /* only names the signal in a notification */
        signum = 0;
    }
    aiorun_notify_stopping(run, (int)signum);
    /* Names the cause; tells the watchdog of a signal that came before
     * its own handler was in. */
    aiorun_run_request(run, CAUSE_SIGNAL, (int)signum);
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
    else {
        aiorun_reload_loop_ready(run);
    }
}

void
aiorun_signals_restore(RunObject *run)
{
    PyObject *type, *value, *tb;
    aiorun_held_signals held;
    aiorun_signals_hold(&held, run->owns_process);
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
    /* One that came meanwhile is run()'s too: dropped, not passed on. */
    aiorun_signals_release(&held, 1);
}

/* The signal module's C handler runs in whichever thread the kernel picks.
 * When that is not the loop's thread, nothing interrupts the loop's wait
 * and the Python handler would run only when the loop next wakes (never,
 * for an idle service).  A wake-up fd (what loop.add_signal_handler()
 * sets up) makes every signal wake the loop; uvloop sets its own while it
 * runs and puts ours back after.  An fd someone else set is kept: an
 * app's add_signal_handler() depends on it, and it wakes the loop too. */
/* warn_on_full_buffer=False even for -1: the flag is global and read by
 * the C handler in any thread, so one set to True while a handler in
 * another thread meets a full pipe prints a spurious warning. */
static PyObject *
set_wakeup_fd_quiet(aiorun_state *st, long fd)
{
    PyObject *kwargs = Py_BuildValue("{sO}", "warn_on_full_buffer", Py_False);
    PyObject *args = kwargs ? Py_BuildValue("(l)", fd) : NULL;
    PyObject *old = args ? PyObject_Call(st->set_wakeup_fd, args, kwargs) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    return old;
}

int
aiorun_signals_wake_loop(RunObject *run)
{
#ifdef MS_WINDOWS
    (void)run;   /* the proactor loop sets its own; the 0.1 s timer does the rest */
    return 0;
#else
    aiorun_state *st = run->state;
    int fds[2];
    if (run->wake_fds[0] >= 0 || !run->owns_process) {
        return 0;
    }
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    run->wake_fds[0] = fds[0];
    run->wake_fds[1] = fds[1];
    PyObject *old = set_wakeup_fd_quiet(st, fds[1]);
    if (old == NULL) {
        goto close;
    }
    long old_fd = PyLong_AsLong(old);
    Py_DECREF(old);
    if (old_fd == -1 && PyErr_Occurred()) {
        goto close;
    }
    if (old_fd != -1) {
        /* Someone else's: give it back (it wakes the loop as well). */
        old = PyObject_CallFunction(st->set_wakeup_fd, "l", old_fd);
        Py_XDECREF(old);
        goto close;
    }
    PyObject *reader = aiorun_run_method(run, "_drain_wakeups");
    PyObject *res = reader ? PyObject_CallMethod(run->loop, "add_reader", "iO",
                                                 fds[0], reader) : NULL;
    Py_XDECREF(reader);
    if (res == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        Py_XDECREF(set_wakeup_fd_quiet(st, -1));
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
        goto close;
    }
    Py_DECREF(res);
    return 0;
close:
    close(fds[0]);
    close(fds[1]);
    run->wake_fds[0] = run->wake_fds[1] = -1;
    return PyErr_Occurred() ? -1 : 0;
#endif
}

void
aiorun_signals_unwake_loop(RunObject *run)
{
#ifndef MS_WINDOWS
    if (run->wake_fds[0] < 0) {
        return;
    }
    aiorun_state *st = run->state;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *old = set_wakeup_fd_quiet(st, -1);
    int ok = old != NULL;
    if (ok) {
        long old_fd = PyLong_AsLong(old);
        Py_DECREF(old);
        ok = !(old_fd == -1 && PyErr_Occurred());
        /* Replaced meanwhile (an add_signal_handler() in the app): keep theirs. */
        if (ok && old_fd != run->wake_fds[1] && old_fd != -1) {
            old = PyObject_CallFunction(st->set_wakeup_fd, "l", old_fd);
            ok = old != NULL;
            Py_XDECREF(old);
        }
    }
    /* A closed loop has forgotten its readers already. */
    int closed = ok ? aiorun_loop_says(run->loop, "is_closed") : -1;
    PyObject *res = NULL;
    if (closed >= 0) {
        res = closed == 0
            ? PyObject_CallMethod(run->loop, "remove_reader", "i", run->wake_fds[0])
            : Py_NewRef(Py_None);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    Py_XDECREF(res);
    close(run->wake_fds[0]);
    close(run->wake_fds[1]);
    run->wake_fds[0] = run->wake_fds[1] = -1;
    PyErr_Restore(type, value, tb);
#else
    (void)run;
#endif
}

PyObject *
aiorun_run_drain_wakeups(PyObject *self, PyObject *unused)
{
    (void)unused;
#ifndef MS_WINDOWS
    RunObject *run = (RunObject *)self;
    char bytes[64];
    while (run->wake_fds[0] >= 0 && read(run->wake_fds[0], bytes, sizeof(bytes)) > 0) {
    }
#else
    (void)self;
#endif
    Py_RETURN_NONE;
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
