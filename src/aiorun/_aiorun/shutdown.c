/* The shutdown phase of run(), after the loop has stopped, in this order:
 * set shutdown_event(), shutdown_callback, drain_delay (the tasks may
 * finish by themselves), with main_first the main task cancelled and
 * waited for alone, cancel the unprotected tasks, wait for all of them
 * (bounded by timeout_task_shutdown), shut the executor down, and close
 * the loop if run() created it.  Then re-raise the pending exception, or
 * return what the main coroutine returned.
 *
 * Every phase runs whatever user code does in the ones before: an error
 * (a callback, a task's cancel(), a logging handler, the executor, a loop
 * that raises) is kept, the first one to be re-raised after "Leaving.
 * Bye!" and later ones logged, and the shutdown goes on.  A loop.stop() in
 * any phase only ends that turn of the loop: the phase runs it again. */
#include "aiorun.h"

#include <math.h>

/* Seconds between looks at tasks whose add_done_callback() failed: the
 * wait cannot be told when they end, so it looks. */
#define POLL_INTERVAL 0.05
/* A wait that user code keeps interrupting (a callback raising SystemExit
 * every turn) gives up after this many tries; the deadline bounds it too. */
#define MAX_INTERRUPTIONS 1000

void
aiorun_keep_exception(RunObject *run, PyObject *exc, const char *message, const char *what)
{
    if (exc == NULL) {
        return;
    }
    /* Raised at the end with its own type and traceback: it must be an
     * exception (a future subclass's exception() may answer anything). */
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_Format(PyExc_TypeError, "%s gave %.200s as its exception", what,
                     Py_TYPE(exc)->tp_name);
        Py_SETREF(exc, aiorun_take_error());
        if (exc == NULL) {
            return;
        }
    }
    if (run->pending_exc == NULL) {
        run->pending_exc = exc;
        return;
    }
    PyObject *arg = PyUnicode_FromString(what);
    if (arg == NULL || aiorun_log_exc(run->state, LOG_ERROR, message, arg, exc) < 0) {
        /* Even logging fails (a filter that raises): stderr, never raise. */
        PyErr_WriteUnraisable((PyObject *)run);
        aiorun_restore_error(Py_NewRef(exc));
        PyErr_WriteUnraisable((PyObject *)run);
    }
    Py_XDECREF(arg);
    Py_DECREF(exc);
}

#define LATER_ERROR                                                          \
    "%s raised an error during the shutdown, but there is already a "        \
    "different exception to re-raise, so this log message is all you're "   \
    "going to see about it."

/* Keeps the error that is set (aiorun_keep_exception); the shutdown goes on. */
void
aiorun_keep_error(RunObject *run, const char *what)
{
    aiorun_keep_exception(run, aiorun_take_error(), LATER_ERROR, what);
}

/* One of aiorun's log lines; a logging filter or handler that raises on it
 * does not stop the shutdown. */
static void
say(RunObject *run, int level, const char *message)
{
    if (aiorun_log(run->state, level, message) < 0) {
        aiorun_keep_error(run, "The \"aiorun\" logger");
    }
}

/* 1 if exc is the outcome of the done future itself (its exception, or
 * the CancelledError of a cancelled one), 0 if it came from elsewhere.
 * Then the future's own exception, which asking for it has marked as
 * retrieved, is kept too: it must not be lost. */
static int
is_own_error(RunObject *run, PyObject *future, PyObject *exc)
{
    aiorun_state *st = run->state;
    int cancelled = aiorun_call_predicate(future, st->s_cancelled);
    if (cancelled != 0) {
        if (cancelled < 0) {
            aiorun_keep_error(run, "The event loop");
            return 1;
        }
        return PyErr_GivenExceptionMatches(exc, st->CancelledError);
    }
    PyObject *own = PyObject_CallMethodNoArgs(future, st->s_exception);
    if (own == NULL) {
        aiorun_keep_error(run, "The event loop");
        return 1;
    }
    if (own == exc) {
        Py_DECREF(own);
        return 1;
    }
    if (own != Py_None && PyExceptionInstance_Check(own)) {
        aiorun_keep_exception(run, own, LATER_ERROR, "A task of the shutdown");
    }
    else {
        Py_DECREF(own);
    }
    return 0;
}

/* loop.run_until_complete(future) until the future is done.  A
 * loop.stop() from the app (a habit aiorun's examples teach) ends a run
 * early, and a KeyboardInterrupt or SystemExit raised by some other task or
 * callback escapes it: both only end that run, the error is kept, and the
 * loop runs again.  -1 with the error set when the future itself is done
 * with an error, or the loop cannot run at all. */
static int
run_until_done(RunObject *run, PyObject *future)
{
    aiorun_state *st = run->state;
    for (int tries = 0;; tries++) {
        PyObject *res = PyObject_CallMethodOneArg(run->loop, st->s_run_until_complete,
                                                  future);
        if (res != NULL) {
            Py_DECREF(res);
            return 0;
        }
        PyObject *exc = aiorun_take_error();
        if (exc == NULL) {
            return -1;   /* NULL without an exception: CPython reports that */
        }
        int is_done = aiorun_call_predicate(future, st->s_done);
        int closed = is_done == 0 ? aiorun_loop_says(run->loop, "is_closed") : -1;
        int running = closed == 0 ? aiorun_loop_says(run->loop, "is_running") : -1;
        int can_rerun = running == 0 && tries < MAX_INTERRUPTIONS;
        if (PyErr_Occurred()) {
            aiorun_keep_error(run, "The event loop");   /* done(), is_closed(), ... */
        }
        if (is_done == 1 && !is_own_error(run, future, exc)) {
            /* Done, and an error of some other callback came out with it
             * (a loop's stop() raising as the wait ended): the wait is
             * over all the same. */
            aiorun_keep_exception(run, exc, LATER_ERROR, "A task or callback");
            return 0;
        }
        if (!can_rerun) {
            aiorun_restore_error(exc);
            return -1;
        }
        /* Not done and the loop stopped: the stop of the app, or an error
         * that escaped the loop from some other task or callback. */
        int is_stop = PyErr_GivenExceptionMatches(exc, PyExc_RuntimeError);
        int escaped = !PyErr_GivenExceptionMatches(exc, PyExc_Exception);
        if (escaped) {
            aiorun_keep_exception(run, exc, LATER_ERROR, "A task or callback");
        }
        else if (is_stop) {
            Py_DECREF(exc);
        }
        else {
            aiorun_restore_error(exc);
            return -1;
        }
        if (run->drain_over && future == run->drain_waiter) {
            return 0;   /* finish_drain() stopped the loop itself */
        }
    }
}

/* asyncio.ensure_future(awaitable, loop=loop), run until it is done. */
static int
await_on_loop(RunObject *run, PyObject *awaitable)
{
    aiorun_state *st = run->state;
    PyObject *args = PyTuple_Pack(1, awaitable);
    PyObject *kwargs = args ? Py_BuildValue("{OO}", st->s_loop, run->loop) : NULL;
    PyObject *future = kwargs ? PyObject_Call(st->ensure_future, args, kwargs) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    if (future == NULL) {
        return -1;
    }
    int rc = run_until_done(run, future);
    Py_DECREF(future);
    return rc;
}

/* Call or await shutdown_callback as its kind asks. */
static int
call_shutdown_callback(RunObject *run, PyObject *callback)
{
    aiorun_state *st = run->state;
    PyObject *awaitable = NULL;

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
        if (is_awaitable <= 0) {
            Py_DECREF(returned);
            return is_awaitable;
        }
        awaitable = returned;
    }
    else {
        /* Awaitable objects were accepted by run()'s argument checks; any
         * other kind never gets here. */
        awaitable = Py_NewRef(callback);
    }
    int rc = await_on_loop(run, awaitable);
    Py_DECREF(awaitable);
    return rc;
}

static void
run_shutdown_callback(RunObject *run, PyObject *callback)
{
    aiorun_run_stage(run, STAGE_CALLBACK);
    say(run, LOG_INFO, "Executing provided shutdown_callback.");
    if (call_shutdown_callback(run, callback) == 0) {
        return;
    }
    /* Any exception, KeyboardInterrupt and SystemExit included, is kept
     * like an unhandled error: the shutdown goes on regardless. */
    aiorun_keep_exception(run, aiorun_take_error(),
                   "The %s raised an error, but there is already a different "
                   "exception raised from the loop, so this log message is all "
                   "you're going to see about it.", "shutdown_callback()");
}

/* task.cancel(msg), the message naming the cause, after the DEBUG line
 * `Cancelling task: ...` (*debug: whether DEBUG is on, -1 until asked).
 * A task class of an app whose cancel() takes no message is cancelled
 * without one. */
static void
cancel_task(RunObject *run, PyObject *task, int *debug)
{
    aiorun_state *st = run->state;
    if (*debug < 0 && (*debug = aiorun_log_enabled(st, LOG_DEBUG)) < 0) {
        aiorun_keep_error(run, "The \"aiorun\" logger");
        *debug = 0;
    }
    if (*debug && aiorun_log_exc(st, LOG_DEBUG, "Cancelling task: %s", task, NULL) < 0) {
        aiorun_keep_error(run, "The \"aiorun\" logger");
    }
    PyObject *res = run->cancel_msg == NULL ? NULL
        : PyObject_CallMethodOneArg(task, st->s_cancel, run->cancel_msg);
    if (res == NULL && (run->cancel_msg == NULL
                        || PyErr_ExceptionMatches(PyExc_TypeError))) {
        PyErr_Clear();
        res = PyObject_CallMethodNoArgs(task, st->s_cancel);
    }
    if (res == NULL) {
        aiorun_keep_error(run, "A task's cancel()");
    }
    else {
        aiorun_report_cancelled(run);
    }
    Py_XDECREF(res);
}

/* Ends the current wait: its last task finished, or its time is up.
 * `waiter` names the wait the callback belongs to: one of an earlier wait
 * (queued in the turn that wait ended) is ignored. */
static PyObject *
finish_drain(RunObject *run, PyObject *waiter)
{
    aiorun_state *st = run->state;
    if (waiter == NULL || waiter != run->drain_waiter || run->drain_over) {
        Py_RETURN_NONE;
    }
    run->drain_over = 1;
    Py_INCREF(waiter);   /* set_result() may run code that drops the run's */
    PyObject *res = PyObject_CallMethodOneArg(waiter, st->s_set_result, Py_None);
    Py_DECREF(waiter);
    if (res != NULL) {
        return res;
    }
    /* set_result() failed (MemoryError): the wait would never end, so the
     * loop is stopped instead, which asks for no memory; run_until_done()
     * sees drain_over. */
    PyObject *exc = aiorun_take_error();
    PyObject *stopped = run->loop ? PyObject_CallMethod(run->loop, "stop", NULL) : NULL;
    if (stopped == NULL) {
        PyErr_Clear();
        if (exc != NULL) {
            aiorun_restore_error(exc);
        }
        return NULL;
    }
    Py_XDECREF(exc);
    return stopped;
}

PyObject *
aiorun_run_task_done(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    if (nargs < 1 || args[0] != run->drain_waiter || run->drain_over) {
        Py_RETURN_NONE;
    }
    if (--run->drain_remaining > 0) {
        Py_RETURN_NONE;
    }
    return finish_drain(run, args[0]);
}

PyObject *
aiorun_run_drain_timeout(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return finish_drain((RunObject *)self, nargs > 0 ? args[0] : NULL);
}

/* partial(run.<method>, waiter): a callback owned by one wait. */
static PyObject *
wait_callback(RunObject *run, const char *method, PyObject *waiter)
{
    PyObject *bound = aiorun_run_method(run, method);
    if (bound == NULL) {
        return NULL;
    }
    PyObject *callback = PyObject_CallFunctionObjArgs(run->state->partial, bound,
                                                      waiter, NULL);
    Py_DECREF(bound);
    return callback;
}

static void
cancel_handle(RunObject *run, PyObject *handle)
{
    PyObject *res = PyObject_CallMethodNoArgs(handle, run->state->s_cancel);
    if (res == NULL) {
        aiorun_keep_error(run, "The event loop");
    }
    Py_XDECREF(res);
}

/* One timed wait: until every task of `tasks` is done or `seconds` passed
 * (< 0: no limit).  The wait owns its future and its callbacks (bound to
 * that future), so a callback an earlier wait left queued never counts
 * here.  A task that refuses a done callback is looked at every
 * POLL_INTERVAL instead.  Errors are kept; returns 0, or -1 when the loop
 * cannot wait at all. */
static int
wait_for_tasks(RunObject *run, PyObject *tasks, double seconds)
{
    aiorun_state *st = run->state;
    PyObject *waiter = NULL, *on_done = NULL, *on_timeout = NULL, *timer = NULL;
    int poll = 0, rc = -1;

    waiter = PyObject_CallMethodNoArgs(run->loop, st->s_create_future);
    if (waiter == NULL || (on_done = wait_callback(run, "_task_done", waiter)) == NULL
        || (on_timeout = wait_callback(run, "_drain_timeout", waiter)) == NULL) {
        goto done;
    }
    Py_XSETREF(run->drain_waiter, Py_NewRef(waiter));
    /* Counted before each callback goes in, so one called at once (by an
     * odd task class) cannot end the wait early. */
    run->drain_remaining = 1;
    run->drain_over = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        run->drain_remaining++;
        PyObject *res = PyObject_CallMethodOneArg(task, st->s_add_done_callback, on_done);
        if (res == NULL) {
            run->drain_remaining--;
            aiorun_keep_error(run, "A task's add_done_callback()");
            poll = 1;
        }
        Py_XDECREF(res);
    }
    /* The count's own 1: only the callbacks end the wait now. */
    if (--run->drain_remaining > 0 || poll) {
        double limit = seconds;
        if (poll && (limit < 0 || limit > POLL_INTERVAL)) {
            limit = POLL_INTERVAL;
        }
        if (limit >= 0 && isfinite(limit)) {
            timer = PyObject_CallMethod(run->loop, "call_later", "dO", limit, on_timeout);
            if (timer == NULL) {
                goto done;
            }
        }
        if (run_until_done(run, waiter) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    if (rc < 0) {
        aiorun_keep_error(run, "The event loop");
    }
    if (timer != NULL) {
        cancel_handle(run, timer);
    }
    /* Take the callbacks back from the tasks still running. */
    for (Py_ssize_t i = 0; on_done != NULL && i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        int is_done = aiorun_call_predicate(task, st->s_done);
        PyObject *res = is_done == 0
            ? PyObject_CallMethodOneArg(task, st->s_remove_done_callback, on_done) : NULL;
        if (is_done < 0 || (is_done == 0 && res == NULL)) {
            aiorun_keep_error(run, "A task");
        }
        Py_XDECREF(res);
    }
    if (run->drain_waiter == waiter) {
        Py_CLEAR(run->drain_waiter);
    }
    Py_XDECREF(waiter);
    Py_XDECREF(on_done);
    Py_XDECREF(on_timeout);
    Py_XDECREF(timer);
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
    if (*now == -1 && PyErr_Occurred()) {
        return -1;
    }
    /* A loop subclass's clock: a NaN or an infinity would make the
     * timeout never come. */
    if (!isfinite(*now)) {
        PyErr_SetString(PyExc_ValueError, "loop.time() returned a time that is not finite");
        return -1;
    }
    return 0;
}

/* The tasks of `tasks` (NULL: the loop's tasks) that are not done, but
 * for `skip` (NULL: none).  A task whose done() raises cannot be waited
 * for: it counts as done. */
static PyObject *
not_done(RunObject *run, PyObject *tasks, PyObject *skip)
{
    aiorun_state *st = run->state;
    PyObject *all = tasks ? Py_NewRef(tasks) : aiorun_run_tasks(run);
    if (all == NULL) {
        return NULL;
    }
    PyObject *pending = PyList_New(0);
    for (Py_ssize_t i = 0; pending != NULL && i < PyList_GET_SIZE(all); i++) {
        PyObject *task = PyList_GET_ITEM(all, i);
        int is_done = aiorun_call_predicate(task, st->s_done);
        if (is_done < 0) {
            aiorun_keep_error(run, "A task's done()");
        }
        else if (!is_done && task != skip && PyList_Append(pending, task) < 0) {
            Py_CLEAR(pending);
        }
    }
    Py_DECREF(all);
    return pending;
}

/* What a wait does with each task it sees for the first time. */
typedef struct {
    aiorun_idset *seen; /* every task already handled */
    int cancel;         /* cancel the unprotected ones */
    int announced;      /* "Cancelling pending tasks." said */
    int said_running;   /* "Running pending tasks till complete" said */
    int stage_stale;    /* the watchdog's stage is not "waiting" yet */
    PyObject *given_up; /* a task waited for to its timeout already, or NULL */
} wait_plan;

/* 1 if task is new to plan->seen (and now in it), 0 if seen before, -1. */
static int
first_sight(wait_plan *plan, PyObject *task)
{
    return aiorun_idset_add(plan->seen, task);
}

/* Cancel the tasks of `pending` not seen before, except the protected. */
static int
cancel_new_tasks(RunObject *run, PyObject *pending, wait_plan *plan)
{
    aiorun_state *st = run->state;
    int debug = -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pending); i++) {
        PyObject *task = PyList_GET_ITEM(pending, i);
        int first = first_sight(plan, task);
        if (first < 0) {
            return -1;
        }
        if (!first || !plan->cancel) {
            continue;
        }
        if (!plan->announced) {
            plan->announced = 1;
            plan->stage_stale = 1;
            aiorun_run_stage(run, STAGE_CANCELLING);
            say(run, LOG_INFO, "Cancelling pending tasks.");
        }
        int protected_ = aiorun_is_protected(st, task);
        if (protected_ < 0) {
            aiorun_keep_error(run, "A task");
        }
        if (protected_ == 0) {
            cancel_task(run, task, &debug);
        }
        else if (protected_ > 0) {
            aiorun_report_protected(run);
        }
    }
    return 0;
}

/* Wait for the tasks of `tasks` (NULL: the loop's tasks, new ones
 * included, looked at again after every wait) until none is left or
 * `seconds` passed on the loop's clock (< 0: no limit); with plan->cancel, each
 * task not seen before is cancelled first unless protected.  Returns the
 * tasks left at the deadline (a new list), or NULL if the loop cannot be
 * waited on (the error is kept). */
static PyObject *
wait_until(RunObject *run, PyObject *tasks, double seconds, wait_plan *plan)
{
    PyObject *pending = NULL;
    /* Counted from the first look at the clock: a clock that cannot be read
     * (MemoryError) ends the wait, never makes it unbounded. */
    double deadline = -1;
    for (int round = 0;; round++) {
        double now = 0;
        Py_XSETREF(pending, not_done(run, tasks, plan->given_up));
        if (pending == NULL || loop_time(run, &now) < 0
            || cancel_new_tasks(run, pending, plan) < 0) {
            break;
        }
        if (round == 0 && seconds >= 0 && isfinite(seconds)) {
            deadline = now + seconds;
        }
        if (PyList_GET_SIZE(pending) == 0) {
            return pending;
        }
        if (plan->announced && !plan->said_running) {
            plan->said_running = 1;
            say(run, LOG_INFO, "Running pending tasks till complete");
        }
        /* (the drain and the main task's wait have said their stage) */
        if (plan->cancel && (round == 0 || plan->stage_stale)) {
            plan->stage_stale = 0;
            aiorun_run_stage(run, STAGE_WAITING_TASKS);
        }
        /* At least one turn of the loop, even for a deadline of 0. */
        if (round > 0 && deadline >= 0 && now >= deadline) {
            return pending;
        }
        double left = deadline < 0 ? -1 : deadline > now ? deadline - now : 0;
        if (wait_for_tasks(run, pending, left) < 0) {
            Py_CLEAR(pending);
            return NULL;
        }
    }
    Py_XDECREF(pending);
    aiorun_keep_error(run, "The event loop");
    return NULL;
}

/* One task of the stuck-tasks warning: its repr, then its stack the way a
 * traceback shows it. */
static int
describe_stuck_task(RunObject *run, PyObject *parts, PyObject *task)
{
    PyObject *described = aiorun_describe_task(task);
    if (described == NULL) {
        return -1;
    }
    aiorun_report_refused_text(run, described);
    /* The frames end in a newline; the log record must not. */
    PyObject *line = PyUnicode_FromFormat("\n%U", described);
    Py_DECREF(described);
    if (line == NULL) {
        return -1;
    }
    /* The functions, not the macros: PyPy's strings are not "ready". */
    Py_ssize_t len = PyUnicode_GetLength(line);
    if (len > 0 && PyUnicode_ReadChar(line, len - 1) == '\n') {
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
        if (describe_stuck_task(run, parts, PyList_GET_ITEM(stuck, i)) < 0) {
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

/* The tasks left at the deadline are named, with where each is stuck. */
static void
report_stuck(RunObject *run, PyObject *stuck, PyObject *timeout)
{
    if (stuck == NULL) {
        return;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(stuck); i++) {
        aiorun_report_refused(run, PyList_GET_ITEM(stuck, i));
    }
    if (PyList_GET_SIZE(stuck) > 0 && warn_stuck_tasks(run, stuck, timeout) < 0) {
        aiorun_keep_error(run, "The warning about tasks that refuse to exit");
    }
}

/* drain_delay: before anything is cancelled, the tasks get up to
 * drain_delay seconds to finish by themselves (shutdown_event() is set).
 * It ends early once every task has finished, new ones included. */
static void
let_tasks_finish(RunObject *run)
{
    aiorun_run_stage(run, STAGE_DRAINING);
    PyObject *delay = PyFloat_FromDouble(run->drain_delay);
    if (delay == NULL || aiorun_log_exc(run->state, LOG_INFO, "Letting tasks finish for "
                                        "up to %s seconds (drain_delay).", delay,
                                        NULL) < 0) {
        aiorun_keep_error(run, "The \"aiorun\" logger");
    }
    Py_XDECREF(delay);
    aiorun_idset seen = AIORUN_IDSET_INIT;
    wait_plan plan = {&seen, 0, 0, 0, 0, NULL};
    PyObject *left = wait_until(run, NULL, run->drain_delay, &plan);
    if (left != NULL) {
        aiorun_report_drained(run, (long)seen.used - (long)PyList_GET_SIZE(left));
        Py_DECREF(left);
    }
    aiorun_idset_clear(&seen);
}

/* main_first: the main task is cancelled alone and waited for (up to
 * timeout_task_shutdown) before the rest, so it can wind things down in
 * order while everything it uses still runs.  It goes into plan->seen, so
 * the rest of the shutdown does not cancel it a second time. */
static void
cancel_main_first(RunObject *run, PyObject *timeout, wait_plan *plan)
{
    aiorun_state *st = run->state;
    PyObject *main = Py_NewRef(run->main_task);
    PyObject *just_main = PyList_New(1);
    if (just_main == NULL || first_sight(plan, main) < 0) {
        aiorun_keep_error(run, "aiorun");
        goto done;
    }
    PyList_SET_ITEM(just_main, 0, Py_NewRef(main));
    int is_done = aiorun_call_predicate(main, st->s_done);
    int protected_ = is_done == 0 ? aiorun_is_protected(st, main) : 0;
    if (is_done < 0 || protected_ < 0) {
        aiorun_keep_error(run, "The main task");
        goto done;
    }
    if (is_done || protected_) {
        goto done;
    }
    aiorun_run_stage(run, STAGE_CANCELLING);
    say(run, LOG_INFO, "Cancelling the main task first.");
    int debug = -1;
    cancel_task(run, main, &debug);
    aiorun_run_stage(run, STAGE_WAITING_TASKS);
    wait_plan only_main = {plan->seen, 0, 0, 0, 0, NULL};
    PyObject *stuck = wait_until(run, just_main, run->task_timeout,
                                 &only_main);
    report_stuck(run, stuck, timeout);
    /* A main task that refused is named already: the rest of the shutdown
     * does not wait timeout_task_shutdown for it a second time. */
    if (stuck != NULL && PyList_GET_SIZE(stuck) > 0) {
        plan->given_up = main;   /* held by run->main_task */
    }
    Py_XDECREF(stuck);
done:
    Py_XDECREF(just_main);
    Py_DECREF(main);
}

/* Cancel every task that shutdown_waits_for() does not protect and wait
 * for them all, up to timeout_task_shutdown.  Tasks started meanwhile (in
 * an `except CancelledError:` block, say) are cancelled in turn, or waited
 * for if protected.
 *
 * The collector is paused from here to the end of the drain.  Each
 * cancellation makes an exception, a traceback and its frames, which the
 * tasks keep until they are freed; with many tasks the collector scans
 * them, and the app's own objects, again and again: over half of the
 * shutdown at 1e5 tasks (bench/RESULTS.md).  What cyclic garbage the drain
 * makes is collected once the collector is on again. */
static void
cancel_and_wait(RunObject *run, PyObject *timeout)
{
    /* The collector belongs to the process (aiorun.h).  A child forked
     * meanwhile gets it back on (aiorun_after_fork_child). */
    aiorun_state *st = run->state;
    int gc_was_enabled = 0;
    if (run->owns_process) {
        if (aiorun_register_fork_hook(st) == 0) {
            gc_was_enabled = PyGC_Disable();
            st->gc_paused = gc_was_enabled;
        }
        else {
            PyErr_Clear();   /* no hook, no pause: the drain is only slower */
        }
    }
    aiorun_idset seen = AIORUN_IDSET_INIT;
    wait_plan plan = {&seen, 1, 0, 0, 0, NULL};
    if (run->main_first && run->main_task != NULL) {
        cancel_main_first(run, timeout, &plan);
    }
    PyObject *stuck = wait_until(run, NULL, run->task_timeout, &plan);
    report_stuck(run, stuck, timeout);
    Py_XDECREF(stuck);
    aiorun_idset_clear(&seen);
    if (gc_was_enabled && st->gc_paused) {
        st->gc_paused = 0;
        PyGC_Enable();
    }
}

/* executor.shutdown(wait=True), by keyword as the original calls it. */
static void
shut_down_executor(RunObject *run, PyObject *executor)
{
    say(run, LOG_INFO, "Waiting for executor shutdown.");
    aiorun_run_stage(run, STAGE_EXECUTOR);
    PyObject *name = PyUnicode_FromString("shutdown");
    PyObject *kwnames = name ? Py_BuildValue("(s)", "wait") : NULL;
    PyObject *args[2] = {executor, Py_True};
    PyObject *res = kwnames ? PyObject_VectorcallMethod(
        name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames) : NULL;
    if (res == NULL) {
        aiorun_keep_error(run, "The executor's shutdown()");
    }
    Py_XDECREF(name);
    Py_XDECREF(kwnames);
    Py_XDECREF(res);
}

/* Every step is tried, whatever the one before did. */
static void
close_own_loop(RunObject *run)
{
    aiorun_state *st = run->state;
    aiorun_run_stage(run, STAGE_ASYNCGENS);
    say(run, LOG_INFO, "Shutting down async generators");
    PyObject *gens = PyObject_CallMethod(run->loop, "shutdown_asyncgens", NULL);
    if (gens == NULL || await_on_loop(run, gens) < 0) {
        aiorun_keep_error(run, "Shutting down async generators");
    }
    Py_XDECREF(gens);
    aiorun_run_stage(run, STAGE_CLOSING);
    say(run, LOG_INFO, "Closing the loop.");
    aiorun_signals_unwake_loop(run);   /* its reader must go before the loop */
    PyObject *res = PyObject_CallMethod(run->loop, "close", NULL);
    if (res == NULL) {
        aiorun_keep_error(run, "The event loop's close()");
    }
    Py_XDECREF(res);
    /* Like asyncio.run(): no closed loop is left as the current one. */
    res = PyObject_CallOneArg(st->set_event_loop, Py_None);
    if (res == NULL) {
        aiorun_keep_error(run, "asyncio.set_event_loop()");
    }
    Py_XDECREF(res);
}

/* What the main coroutine returned, if it returned: before the shutdown,
 * while the tasks drained, or after catching its cancellation.  None if it
 * was cancelled, raised, or is still running. */
static PyObject *
main_result(RunObject *run)
{
    aiorun_state *st = run->state;
    PyObject *task = run->main_task, *result = NULL;
    if (task == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(task);
    int is_done = aiorun_call_predicate(task, st->s_done);
    int is_cancelled = is_done > 0 ? aiorun_call_predicate(task, st->s_cancelled) : 1;
    if (is_done < 0 || is_cancelled != 0) {
        goto done;
    }
    /* An exception is reported by _main_done; it is not a result. */
    PyObject *exc = PyObject_CallMethodNoArgs(task, st->s_exception);
    if (exc != NULL && exc == Py_None) {
        result = PyObject_CallMethodNoArgs(task, st->s_result);
    }
    Py_XDECREF(exc);
done:
    Py_DECREF(task);
    if (PyErr_Occurred()) {
        aiorun_keep_error(run, "The main task");
    }
    return result ? result : Py_NewRef(Py_None);
}

PyObject *
aiorun_shutdown(RunObject *run, PyObject *shutdown_callback, PyObject *executor,
                PyObject *timeout)
{
    aiorun_state *st = run->state;

    say(run, LOG_INFO, "Entering shutdown phase.");
    if ((run->cancel_msg = aiorun_shutdown_message(run)) == NULL) {
        aiorun_keep_error(run, "aiorun");   /* tasks are cancelled without one */
    }
    if (aiorun_run_begin_shutdown(run) < 0) {
        aiorun_keep_error(run, "shutdown_event().set()");
    }
    if (shutdown_callback != Py_None) {
        run_shutdown_callback(run, shutdown_callback);
    }
    if (run->drain_delay > 0) {
        let_tasks_finish(run);
    }
    cancel_and_wait(run, timeout);
    PyObject *result = main_result(run);
    shut_down_executor(run, executor);
    if (run->own_loop) {
        close_own_loop(run);
    }
    aiorun_run_stage(run, STAGE_LEAVING);
    say(run, LOG_INFO, "Leaving. Bye!");
    /* Out of the field before the log call: a logging handler may call the
     * loop's exception handler, which sets and clears the field. */
    PyObject *exc = run->pending_exc;
    run->pending_exc = NULL;
    if (exc != NULL && aiorun_log(st, LOG_INFO, "Reraising unhandled exception") < 0) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    /* The summary runs Python code (logging, threading, a signal handler
     * between two of its calls): an error there is kept as any other, and
     * is what run() raises if nothing else is. */
    aiorun_report_end(run, exc);
    PyObject *later = run->pending_exc;
    run->pending_exc = NULL;
    if (exc == NULL) {
        exc = later;
    }
    else if (later != NULL) {
        /* Logged, never put in the field: the log call may run the loop's
         * exception handler, which sets it. */
        PyObject *what = PyUnicode_FromString("The shutdown summary");
        if (what == NULL || aiorun_log_exc(st, LOG_ERROR, LATER_ERROR, what, later) < 0) {
            PyErr_WriteUnraisable((PyObject *)run);
        }
        Py_XDECREF(what);
        Py_DECREF(later);
    }
    if (exc == NULL) {
        return result;
    }
    Py_DECREF(result);
    /* Raise it with the traceback it already carries, so the user sees
     * where it came from. */
    aiorun_restore_error(exc);
    return NULL;
}
