/* The shutdown phase of run(), after the loop has stopped, in this order:
 * shutdown_callback, cancel the unprotected tasks, wait for all of them
 * (bounded by timeout_task_shutdown), shut the executor down, and close
 * the loop if run() created it.  Then re-raise the pending exception. */
#include "aiorun.h"

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

/* Cancel every task of `tasks` that shutdown_waits_for() does not protect. */
static int
cancel_tasks(RunObject *run, PyObject *tasks)
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
        if (protected_) {
            continue;
        }
        if (debug && aiorun_log_exc(st, LOG_DEBUG, "Cancelling task: %s", task,
                                    NULL) < 0) {
            return -1;
        }
        PyObject *res = PyObject_CallMethodNoArgs(task, st->s_cancel);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    return 0;
}

/* Ends the drain: the last task finished, or the timeout passed. */
static PyObject *
finish_drain(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *waiter = run->drain_waiter;
    if (waiter == NULL) {
        Py_RETURN_NONE;
    }
    int is_done = aiorun_call_predicate(waiter, st->s_done);
    if (is_done != 0) {
        return is_done < 0 ? NULL : Py_NewRef(Py_None);
    }
    return PyObject_CallMethodOneArg(waiter, st->s_set_result, Py_None);
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
    PyObject *described = aiorun_format_task(task);
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

/* Wait until every task in `tasks` is done or `timeout` seconds passed. */
static int
drain(RunObject *run, PyObject *tasks, PyObject *timeout)
{
    aiorun_state *st = run->state;
    PyObject *on_done = NULL, *on_timeout = NULL, *timer = NULL;
    PyObject *stuck = NULL, *res = NULL;
    int rc = -1;

    /* One at a time: no call may be made with an exception already set. */
    if ((run->drain_waiter = PyObject_CallMethodNoArgs(run->loop, st->s_create_future)) == NULL
        || (on_done = aiorun_run_method(run, "_task_done")) == NULL
        || (stuck = PyList_New(0)) == NULL) {
        goto done;
    }
    run->drain_remaining = 0;
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
    if (run->drain_remaining > 0) {
        double seconds = timeout == Py_None ? INFINITY : PyFloat_AsDouble(timeout);
        if (isfinite(seconds)) {
            on_timeout = aiorun_run_method(run, "_drain_timeout");
            timer = on_timeout ? PyObject_CallMethod(run->loop, "call_later", "OO",
                                                     timeout, on_timeout)
                               : NULL;
            if (timer == NULL) {
                goto done;
            }
        }
        res = PyObject_CallMethodOneArg(run->loop, st->s_run_until_complete,
                                        run->drain_waiter);
        if (res == NULL) {
            goto done;
        }
        Py_CLEAR(res);
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
    if (PyList_GET_SIZE(stuck) > 0 && warn_stuck_tasks(run, stuck, timeout) < 0) {
        goto done;
    }
    rc = 0;
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
    PyObject *task_set = PyObject_CallOneArg(st->all_tasks, run->loop);
    PyObject *tasks = task_set ? PySequence_List(task_set) : NULL;
    Py_XDECREF(task_set);
    if (tasks == NULL) {
        goto done;
    }
    rc = 0;
    if (PyList_GET_SIZE(tasks) > 0) {
        aiorun_run_stage(run, STAGE_CANCELLING);
        rc = (aiorun_log(st, LOG_INFO, "Cancelling pending tasks.") < 0
              || cancel_tasks(run, tasks) < 0
              || aiorun_log(st, LOG_INFO, "Running pending tasks till complete") < 0)
            ? -1 : 0;
        if (rc == 0) {
            aiorun_run_stage(run, STAGE_WAITING_TASKS);
            rc = drain(run, tasks, timeout);
        }
    }
    Py_DECREF(tasks);
done:
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

PyObject *
aiorun_shutdown(RunObject *run, PyObject *shutdown_callback, PyObject *executor,
                PyObject *timeout)
{
    aiorun_state *st = run->state;

    if (aiorun_log(st, LOG_INFO, "Entering shutdown phase.") < 0) {
        return NULL;
    }
    if (shutdown_callback != Py_None) {
        aiorun_run_stage(run, STAGE_CALLBACK);
        if (run_shutdown_callback(run, shutdown_callback) < 0) {
            return NULL;
        }
    }
    if (cancel_and_wait(run, timeout) < 0) {
        return NULL;
    }
    if (aiorun_log(st, LOG_INFO, "Waiting for executor shutdown.") < 0) {
        return NULL;
    }
    aiorun_run_stage(run, STAGE_EXECUTOR);
    PyObject *res = PyObject_CallMethod(executor, "shutdown", "O", Py_True);
    if (res == NULL) {
        return NULL;
    }
    Py_DECREF(res);
    if (run->own_loop && close_own_loop(run) < 0) {
        return NULL;
    }
    aiorun_run_stage(run, STAGE_LEAVING);
    if (aiorun_log(st, LOG_INFO, "Leaving. Bye!") < 0) {
        return NULL;
    }
    if (run->pending_exc == NULL) {
        Py_RETURN_NONE;
    }
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
}
