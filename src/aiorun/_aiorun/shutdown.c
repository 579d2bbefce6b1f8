/* The shutdown phase of run(), after the loop has stopped, in this order:
 * set shutdown_event(), shutdown_callback, drain_delay (the tasks may
 * finish by themselves), with main_first the main task cancelled and
 * waited for alone, cancel the unprotected tasks, wait for all of them
 * (bounded by timeout_task_shutdown), shut the executor down, and close
 * the loop if run() created it.  Then re-raise the pending exception, or
 * return what the main coroutine returned. */
#include "aiorun.h"

#include <limits.h>
#include <math.h>

/* Call or await shutdown_callback as its kind asks. */
static int
call_shutdown_callback(RunObject *run, PyObject *callback)
{
    aiorun_state *st = run->state;
    PyObject *awaitable = NULL, *res = NULL;
    int rc = -1;

    if (PyCoro_CheckExact(callback)) {
        awaitable = Py_NewRef(callback);
    }
    else if (PyCallable_Check(callback)) {
        /* A coroutine function, or any callable: called with the loop.  A
         * callable that returns an awaitable (a partial of a coroutine
         * function, a lambda) gets it awaited too. */
        PyObject *returned = PyObject_CallOneArg(callback, run->loop);
        if (returned == NULL) {
            return -1;
        }
        PyObject *check = PyObject_CallOneArg(st->isawaitable, returned);
        int is_awaitable = check ? PyObject_IsTrue(check) : -1;
        Py_XDECREF(check);
        if (is_awaitable < 0) {
            Py_DECREF(returned);
            return -1;
        }
        if (!is_awaitable) {
            Py_DECREF(returned);
            return 0;
        }
        awaitable = returned;
    }
    else {
        /* Awaitable objects were accepted by run()'s argument checks; any
         * other kind never gets here. */
        awaitable = Py_NewRef(callback);
    }
    res = PyObject_CallMethodOneArg(run->loop, st->s_run_until_complete, awaitable);
    if (res != NULL) {
        rc = 0;
    }
    Py_DECREF(awaitable);
    Py_XDECREF(res);
    return rc;
}

static int
run_shutdown_callback(RunObject *run, PyObject *callback)
{
    aiorun_state *st = run->state;
    if (aiorun_log(st, LOG_INFO, "Executing provided shutdown_callback.") < 0) {
        return -1;
    }
    if (call_shutdown_callback(run, callback) == 0) {
        return 0;
    }
    /* Any exception, KeyboardInterrupt and SystemExit included, is kept
     * like an unhandled error: the shutdown goes on regardless. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (run->pending_exc == NULL) {
        run->pending_exc = value;
        return 0;
    }
    int rc = aiorun_log_exc(
        st, LOG_ERROR,
        "The shutdown_callback() raised an error, but there is already a "
        "different exception raised from the loop, so this log message is all "
        "you're going to see about it.", NULL, value);
    Py_DECREF(value);
    return rc;
}

/* task.cancel(msg), the message naming the cause.  A task class of an
 * app whose cancel() takes no message is cancelled without one. */
static int
cancel_task(RunObject *run, PyObject *task)
{
    aiorun_state *st = run->state;
    PyObject *res = PyObject_CallMethodOneArg(task, st->s_cancel, run->cancel_msg);
    if (res == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        res = PyObject_CallMethodNoArgs(task, st->s_cancel);
    }
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

/* Cancel every task of `tasks` that shutdown_waits_for() does not protect,
 * except `skip` (NULL: none). */
static int
cancel_tasks(RunObject *run, PyObject *tasks, PyObject *skip)
{
    aiorun_state *st = run->state;
    int debug;
    Py_ssize_t any_protected;
    if ((debug = aiorun_log_enabled(st, LOG_DEBUG)) < 0
        || (any_protected = PyObject_Size(st->do_not_cancel)) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        int protected_ = any_protected ? aiorun_is_protected(st, task) : 0;
        if (protected_ < 0) {
            return -1;
        }
        if (protected_ || task == skip) {
            continue;
        }
        if (debug && aiorun_log_exc(st, LOG_DEBUG, "Cancelling task: %s", task,
                                    NULL) < 0) {
            return -1;
        }
        if (cancel_task(run, task) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Ends the drain: the last task finished, or the timeout passed. */
static PyObject *
finish_drain(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *waiter = run->drain_waiter;
    if (waiter == NULL || run->drain_over) {
        Py_RETURN_NONE;
    }
    run->drain_over = 1;
    PyObject *res = PyObject_CallMethodOneArg(waiter, st->s_set_result, Py_None);
    if (res != NULL) {
        return res;
    }
    /* set_result() failed (MemoryError): the wait would never end, so the
     * loop is stopped instead, which asks for no memory; run_until_done()
     * sees drain_over. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *stopped = PyObject_CallMethod(run->loop, "stop", NULL);
    if (stopped == NULL) {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return stopped;
}

PyObject *
aiorun_run_task_done(PyObject *self, PyObject *task)
{
    RunObject *run = (RunObject *)self;
    (void)task;
    if (--run->drain_remaining > 0) {
        Py_RETURN_NONE;
    }
    return finish_drain(run);
}

PyObject *
aiorun_run_drain_timeout(PyObject *self, PyObject *unused)
{
    (void)unused;
    return finish_drain((RunObject *)self);
}

/* One task of the stuck-tasks warning: its repr, then its stack the way a
 * traceback shows it. */
static int
describe_stuck_task(PyObject *parts, PyObject *task)
{
    PyObject *described = aiorun_describe_task(task);
    if (described == NULL) {
        return -1;
    }
    /* The frames end in a newline; the log record must not. */
    PyObject *line = PyUnicode_FromFormat("\n%U", described);
    Py_DECREF(described);
    if (line == NULL) {
        return -1;
    }
    Py_ssize_t len = PyUnicode_GET_LENGTH(line);
    if (len > 0 && PyUnicode_READ_CHAR(line, len - 1) == '\n') {
        Py_SETREF(line, PyUnicode_Substring(line, 0, len - 1));
    }
    int rc = line ? PyList_Append(parts, line) : -1;
    Py_XDECREF(line);
    return rc;
}

static int
warn_stuck_tasks(RunObject *run, PyObject *stuck, PyObject *timeout)
{
    PyObject *parts = PyList_New(0), *head = NULL, *text = NULL, *empty = NULL;
    int rc = -1;
    if (parts == NULL) {
        return -1;
    }
    head = PyUnicode_FromFormat(
        "During shutdown, the following tasks refused to exit after %S seconds:",
        timeout);
    if (head == NULL || PyList_Append(parts, head) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(stuck); i++) {
        if (describe_stuck_task(parts, PyList_GET_ITEM(stuck, i)) < 0) {
            goto done;
        }
    }
    empty = PyUnicode_FromString("");
    text = empty ? PyUnicode_Join(empty, parts) : NULL;
    if (text == NULL) {
        goto done;
    }
    rc = aiorun_log_exc(run->state, LOG_WARNING, "%s", text, NULL);
done:
    Py_DECREF(parts);
    Py_XDECREF(head);
    Py_XDECREF(empty);
    Py_XDECREF(text);
    return rc;
}

/* loop.run_until_complete(future), run again when the app's loop.stop()
 * (a habit aiorun's examples teach) ends it before the future is done:
 * a stop from a task that is winding down must not abort the shutdown. */
static int
run_until_done(RunObject *run, PyObject *future)
{
    aiorun_state *st = run->state;
    for (;;) {
        PyObject *res = PyObject_CallMethodOneArg(run->loop, st->s_run_until_complete,
                                                  future);
        if (res != NULL) {
            Py_DECREF(res);
            return 0;
        }
        if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            return -1;
        }
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        int is_done = aiorun_call_predicate(future, st->s_done);
        PyObject *closed = is_done == 0 ? PyObject_CallMethod(run->loop, "is_closed", NULL)
                                        : NULL;
        PyObject *running = closed == Py_False
            ? PyObject_CallMethod(run->loop, "is_running", NULL) : NULL;
        int stopped = running == Py_False;
        Py_XDECREF(closed);
        Py_XDECREF(running);
        if (!stopped) {
            /* Not a stop: keep the first error, not one from the checks. */
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
            return -1;
        }
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (run->drain_over) {
            return 0;   /* finish_drain() stopped the loop itself */
        }
    }
}

/* Wait until every task in `tasks` is done or `seconds` passed (< 0: no
 * limit).  *pending gets a new list of the tasks still not done.  Returns
 * how many were not done at the start, or -1. */
static int
wait_for_tasks(RunObject *run, PyObject *tasks, double seconds, PyObject **pending)
{
    aiorun_state *st = run->state;
    PyObject *on_done = NULL, *on_timeout = NULL, *timer = NULL;
    PyObject *stuck = NULL, *res = NULL;
    int rc = -1;

    *pending = NULL;
    /* One at a time: no call may be made with an exception already set. */
    if ((run->drain_waiter = PyObject_CallMethodNoArgs(run->loop, st->s_create_future)) == NULL
        || (on_done = aiorun_run_method(run, "_task_done")) == NULL
        || (stuck = PyList_New(0)) == NULL) {
        goto done;
    }
    run->drain_remaining = 0;
    run->drain_over = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        int is_done = aiorun_call_predicate(task, st->s_done);
        if (is_done < 0) {
            goto done;
        }
        if (is_done) {
            continue;
        }
        res = PyObject_CallMethodOneArg(task, st->s_add_done_callback, on_done);
        if (res == NULL) {
            goto done;
        }
        Py_CLEAR(res);
        run->drain_remaining++;
    }
    Py_ssize_t waited = run->drain_remaining;
    if (waited > 0) {
        if (seconds >= 0 && isfinite(seconds)) {
            on_timeout = aiorun_run_method(run, "_drain_timeout");
            timer = on_timeout ? PyObject_CallMethod(run->loop, "call_later", "dO",
                                                     seconds, on_timeout)
                               : NULL;
            if (timer == NULL) {
                goto done;
            }
        }
        if (run_until_done(run, run->drain_waiter) < 0) {
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        int is_done = aiorun_call_predicate(task, st->s_done);
        if (is_done < 0) {
            goto done;
        }
        if (!is_done) {
            if (PyList_Append(stuck, task) < 0) {
                goto done;
            }
            res = PyObject_CallMethodOneArg(task, st->s_remove_done_callback, on_done);
            if (res == NULL) {
                goto done;
            }
            Py_CLEAR(res);
        }
    }
    *pending = Py_NewRef(stuck);
    rc = waited > INT_MAX ? INT_MAX : (int)waited;
done:
    if (timer != NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *cancelled = PyObject_CallMethodNoArgs(timer, st->s_cancel);
        if (cancelled == NULL) {
            PyErr_WriteUnraisable(timer);
        }
        Py_XDECREF(cancelled);
        PyErr_Restore(type, value, tb);
    }
    Py_CLEAR(run->drain_waiter);
    Py_XDECREF(on_done);
    Py_XDECREF(on_timeout);
    Py_XDECREF(timer);
    Py_XDECREF(stuck);
    return rc;
}

/* Wait for the cancelled `tasks`, up to `timeout` (timeout_task_shutdown),
 * and name those that refuse to exit. */
static int
drain(RunObject *run, PyObject *tasks, PyObject *timeout)
{
    double seconds = timeout == Py_None ? -1 : PyFloat_AsDouble(timeout);
    PyObject *stuck;
    if ((seconds == -1 && PyErr_Occurred())
        || wait_for_tasks(run, tasks, seconds, &stuck) < 0) {
        return -1;
    }
    int rc = PyList_GET_SIZE(stuck) > 0 ? warn_stuck_tasks(run, stuck, timeout) : 0;
    Py_DECREF(stuck);
    return rc;
}

static int
loop_time(RunObject *run, double *now)
{
    PyObject *t = PyObject_CallMethod(run->loop, "time", NULL);
    if (t == NULL) {
        return -1;
    }
    *now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return *now == -1 && PyErr_Occurred() ? -1 : 0;
}

/* drain_delay: before anything is cancelled, the tasks get up to
 * drain_delay seconds to finish by themselves (shutdown_event() is set).
 * It ends early once every task has finished, new ones included. */
static int
let_tasks_finish(RunObject *run)
{
    aiorun_state *st = run->state;
    double now, deadline;
    if (loop_time(run, &now) < 0) {
        return -1;
    }
    deadline = now + run->drain_delay;
    aiorun_run_stage(run, STAGE_DRAINING);
    PyObject *delay = PyFloat_FromDouble(run->drain_delay);
    int rc = delay ? aiorun_log_exc(st, LOG_INFO, "Letting tasks finish for up to %s "
                                    "seconds (drain_delay).", delay, NULL) : -1;
    Py_XDECREF(delay);
    while (rc == 0) {
        PyObject *tasks = aiorun_run_tasks(run), *pending = NULL;
        if (tasks == NULL || loop_time(run, &now) < 0) {
            Py_XDECREF(tasks);
            return -1;
        }
        if (now >= deadline) {
            Py_DECREF(tasks);
            break;
        }
        int waited = wait_for_tasks(run, tasks, deadline - now, &pending);
        Py_DECREF(tasks);
        if (waited < 0) {
            return -1;
        }
        /* Some still running: the time is up.  None was running: done.
         * Otherwise look again, for tasks started meanwhile. */
        Py_ssize_t still = PyList_GET_SIZE(pending);
        Py_DECREF(pending);
        if (still > 0 || waited == 0) {
            break;
        }
    }
    return rc;
}

/* main_first: the main task is cancelled alone and waited for (up to
 * timeout_task_shutdown) before the rest, so it can wind things down in
 * order while everything it uses still runs. */
static int
cancel_main_first(RunObject *run, PyObject *timeout)
{
    aiorun_state *st = run->state;
    PyObject *main = run->main_task;
    int is_done = aiorun_call_predicate(main, st->s_done);
    int protected_ = is_done == 0 ? aiorun_is_protected(st, main) : 0;
    if (is_done < 0 || protected_ < 0) {
        return -1;
    }
    if (is_done || protected_) {
        return 0;
    }
    aiorun_run_stage(run, STAGE_CANCELLING);
    if (aiorun_log(st, LOG_INFO, "Cancelling the main task first.") < 0
        || cancel_task(run, main) < 0) {
        return -1;
    }
    aiorun_run_stage(run, STAGE_WAITING_TASKS);
    PyObject *just_main = PyList_New(1);
    if (just_main == NULL) {
        return -1;
    }
    PyList_SET_ITEM(just_main, 0, Py_NewRef(main));
    int rc = drain(run, just_main, timeout);
    Py_DECREF(just_main);
    return rc;
}

/* The collector is paused from here to the end of the drain.  Each
 * cancellation makes an exception, a traceback and its frames, which the
 * tasks keep until they are freed; with many tasks the collector scans
 * them, and the app's own objects, again and again: over half of the
 * shutdown at 1e5 tasks (bench/RESULTS.md).  What cyclic garbage the drain
 * makes is collected once the collector is on again. */
static int
cancel_and_wait(RunObject *run, PyObject *timeout)
{
    aiorun_state *st = run->state;
    int gc_was_enabled = PyGC_Disable();
    int rc = -1;
    PyObject *tasks = NULL;
    PyObject *skip = run->main_first ? run->main_task : NULL;
    if (skip != NULL && cancel_main_first(run, timeout) < 0) {
        goto done;
    }
    /* Taken now: tasks the main task started while it wound down count. */
    if ((tasks = aiorun_run_tasks(run)) == NULL) {
        goto done;
    }
    rc = 0;
    if (PyList_GET_SIZE(tasks) > 0) {
        aiorun_run_stage(run, STAGE_CANCELLING);
        rc = (aiorun_log(st, LOG_INFO, "Cancelling pending tasks.") < 0
              || cancel_tasks(run, tasks, skip) < 0
              || aiorun_log(st, LOG_INFO, "Running pending tasks till complete") < 0)
            ? -1 : 0;
        if (rc == 0) {
            aiorun_run_stage(run, STAGE_WAITING_TASKS);
            rc = drain(run, tasks, timeout);
        }
    }
done:
    Py_XDECREF(tasks);
    if (gc_was_enabled) {
        PyGC_Enable();
    }
    return rc;
}

static int
close_own_loop(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *gens = NULL, *res = NULL;
    aiorun_run_stage(run, STAGE_ASYNCGENS);
    if (aiorun_log(st, LOG_INFO, "Shutting down async generators") < 0) {
        return -1;
    }
    gens = PyObject_CallMethod(run->loop, "shutdown_asyncgens", NULL);
    if (gens == NULL) {
        return -1;
    }
    res = PyObject_CallMethodOneArg(run->loop, st->s_run_until_complete, gens);
    Py_DECREF(gens);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    aiorun_run_stage(run, STAGE_CLOSING);
    if (aiorun_log(st, LOG_INFO, "Closing the loop.") < 0) {
        return -1;
    }
    aiorun_signals_unwake_loop(run);   /* its reader must go before the loop */
    res = PyObject_CallMethod(run->loop, "close", NULL);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    /* Like asyncio.run(): no closed loop is left as the current one. */
    res = PyObject_CallOneArg(st->set_event_loop, Py_None);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* What the main coroutine returned, if it returned: before the shutdown,
 * while the tasks drained, or after catching its cancellation.  None if it
 * was cancelled, raised, or is still running. */
static PyObject *
main_result(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *task = run->main_task;
    if (task == NULL) {
        Py_RETURN_NONE;
    }
    int is_done = aiorun_call_predicate(task, st->s_done);
    int is_cancelled = is_done > 0 ? aiorun_call_predicate(task, st->s_cancelled) : 1;
    if (is_done < 0 || is_cancelled < 0) {
        return NULL;
    }
    if (is_cancelled) {
        Py_RETURN_NONE;
    }
    /* An exception is reported by _main_done; it is not a result. */
    PyObject *exc = PyObject_CallMethodNoArgs(task, st->s_exception);
    if (exc == NULL) {
        return NULL;
    }
    int failed = exc != Py_None;
    Py_DECREF(exc);
    return failed ? Py_NewRef(Py_None) : PyObject_CallMethodNoArgs(task, st->s_result);
}

PyObject *
aiorun_shutdown(RunObject *run, PyObject *shutdown_callback, PyObject *executor,
                PyObject *timeout)
{
    aiorun_state *st = run->state;
    PyObject *result = NULL, *res;

    if (aiorun_log(st, LOG_INFO, "Entering shutdown phase.") < 0
        || (run->cancel_msg = aiorun_shutdown_message(run)) == NULL
        || aiorun_run_begin_shutdown(run) < 0) {
        goto fail;
    }
    if (shutdown_callback != Py_None) {
        aiorun_run_stage(run, STAGE_CALLBACK);
        if (run_shutdown_callback(run, shutdown_callback) < 0) {
            goto fail;
        }
    }
    if (run->drain_delay > 0 && let_tasks_finish(run) < 0) {
        goto fail;
    }
    if (cancel_and_wait(run, timeout) < 0 || (result = main_result(run)) == NULL) {
        goto fail;
    }
    if (aiorun_log(st, LOG_INFO, "Waiting for executor shutdown.") < 0) {
        goto fail;
    }
    aiorun_run_stage(run, STAGE_EXECUTOR);
    res = PyObject_CallMethod(executor, "shutdown", "O", Py_True);
    if (res == NULL) {
        goto fail;
    }
    Py_DECREF(res);
    if (run->own_loop && close_own_loop(run) < 0) {
        goto fail;
    }
    aiorun_run_stage(run, STAGE_LEAVING);
    if (aiorun_log(st, LOG_INFO, "Leaving. Bye!") < 0) {
        goto fail;
    }
    if (run->pending_exc == NULL) {
        return result;
    }
    Py_CLEAR(result);
    if (aiorun_log(st, LOG_INFO, "Reraising unhandled exception") < 0) {
        return NULL;
    }
    /* Raise it with the traceback it already carries, so the user sees
     * where it came from. */
    PyObject *exc = run->pending_exc;
    run->pending_exc = NULL;
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
    return NULL;
fail:
    Py_XDECREF(result);
    return NULL;
}
