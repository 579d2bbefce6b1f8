/* run(): argument checks, set-up, and running the loop until it stops.
 * The shutdown phase that follows lives in shutdown.c. */
#include "aiorun.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEADLINE_ENV "AIORUN_SHUTDOWN_DEADLINE"
#define REPEATED_SIGNAL_ENV "AIORUN_EXIT_ON_REPEATED_SIGNAL"
#define COVERS_EXIT_ENV "AIORUN_DEADLINE_COVERS_EXIT"
#define REAP_ORPHANS_ENV "AIORUN_REAP_ORPHANS"

typedef struct {
    PyObject *coro;
    PyObject *loop;
    PyObject *shutdown_handler;
    PyObject *shutdown_callback;
    PyObject *executor_workers;
    PyObject *executor;
    PyObject *use_uvloop;
    PyObject *stop_on_unhandled_errors;
    PyObject *timeout_task_shutdown;
    PyObject *shutdown_deadline;
    PyObject *exit_on_repeated_signal;
    PyObject *notify_ready_on_start;
    PyObject *drain_delay;
    PyObject *cancel_main_first;
    PyObject *task_dump_signal;
    PyObject *reap_orphans;
    PyObject *reload_callback;
    PyObject *deadline_covers_exit;
    PyObject *health;
    PyObject *liveness_timeout;
    PyObject *shutdown_report;
} run_args;

/* What the arguments say, once checked. */
typedef struct {
    int use_uvloop;
    int stop_on_errors;
    int ready_on_start;        /* READY=1 when the main coroutine starts */
    double task_timeout;       /* seconds, -1 for None */
    double drain_delay;        /* seconds, 0 for none */
    int main_first;
    int dump_signum;           /* 0 for none */
    int reap_orphans;
} run_flags;

/* What the watchdog is asked to do, from the arguments or the environment. */
typedef struct {
    double deadline;           /* seconds, 0 for none */
    int exit_on_repeat;
    int covers_exit;           /* the watchdog stays until the process exits */
} watchdog_args;

static int
type_error(const char *param, const char *expected, PyObject *got)
{
    PyErr_Format(PyExc_TypeError, "run() argument '%s' must be %s, not %.200s",
                 param, expected, Py_TYPE(got)->tp_name);
    return -1;
}

/* 1 if obj is awaitable (inspect.isawaitable), 0 if not, -1 on error. */
static int
is_awaitable(aiorun_state *st, PyObject *obj)
{
    PyObject *res = PyObject_CallOneArg(st->isawaitable, obj);
    if (res == NULL) {
        return -1;
    }
    int ok = PyObject_IsTrue(res);
    Py_DECREF(res);
    return ok;
}

static int
check_instance(PyObject *obj, PyObject *cls, const char *param, const char *expected)
{
    if (obj == Py_None) {
        return 0;
    }
    int ok = PyObject_IsInstance(obj, cls);
    if (ok < 0) {
        return -1;
    }
    return ok ? 0 : type_error(param, expected, obj);
}

/* A flag: bool or int, as aiorun's callers pass them. */
static int
check_flag(PyObject *obj, const char *param, int *out)
{
    if (!PyLong_Check(obj)) {
        return type_error(param, "bool", obj);
    }
    *out = PyObject_IsTrue(obj);
    return *out < 0 ? -1 : 0;
}

/* A number of seconds from a parameter: None stays -1; otherwise it must
 * be an int or float, finite and at least `min` (strictly above when
 * `exclusive`). */
static int
check_seconds(PyObject *obj, const char *param, double min, int exclusive,
              double *out)
{
    *out = -1;
    if (obj == Py_None) {
        return 0;
    }
    if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyFloat_Check(obj))) {
        return type_error(param, "a number of seconds or None", obj);
    }
    double seconds = PyFloat_AsDouble(obj);
    if (seconds == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (isnan(seconds) || seconds < min || (exclusive && seconds == min)
        || (exclusive && isinf(seconds))) {
        char bound[32];  /* PyErr_Format has no %g */
        snprintf(bound, sizeof(bound), "%g", min);
        PyErr_Format(PyExc_ValueError, "run() argument '%s' must be %s %s%s",
                     param, exclusive ? ">" : ">=", bound,
                     exclusive ? " and finite" : "");
        return -1;
    }
    *out = seconds;
    return 0;
}

/* A flag that None leaves to the environment variable `env` (unset,
 * empty or "0": off; "1": on).  The parameter wins over the environment,
 * so an operator can turn on what a service's code says nothing about.
 * env_name NULL: the environment does not apply. */
static int
flag_or_env(aiorun_state *st, PyObject *flag, const char *param, const char *env_name,
            int *out)
{
    if (flag != Py_None) {
        return check_flag(flag, param, out);
    }
    *out = 0;
    PyObject *value = NULL;
    if (env_name != NULL && aiorun_getenv(st, env_name, &value) < 0) {
        return -1;
    }
    const char *env = value ? PyBytes_AS_STRING(value) : NULL;
    int rc = 0;
    if (env == NULL || *env == '\0' || strcmp(env, "0") == 0) {
        rc = 0;
    }
    else if (strcmp(env, "1") == 0) {
        *out = 1;
    }
    else {
        PyErr_Format(PyExc_ValueError, "environment variable %s must be 0 or 1, not "
                     "'%.100s'", env_name, env);
        rc = -1;
    }
    Py_XDECREF(value);
    return rc;
}

/* task_dump_signal: None or False for none, True for SIGUSR1, or a signal
 * number that run() does not use otherwise and that can be caught. */
static int
check_dump_signal(PyObject *obj, int *signum)
{
    *signum = 0;
    if (obj == Py_None || obj == Py_False) {
        return 0;
    }
    if (obj == Py_True) {
#ifdef SIGUSR1
        *signum = SIGUSR1;
        return 0;
#else
        PyErr_SetString(PyExc_ValueError, "run() argument 'task_dump_signal': this "
                        "platform has no SIGUSR1; pass a signal number");
        return -1;
#endif
    }
    if (!PyLong_Check(obj)) {
        return type_error("task_dump_signal", "a signal number, True or None", obj);
    }
    int overflow;
    long n = PyLong_AsLongAndOverflow(obj, &overflow);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || n < 1 || n >= NSIG) {
        PyErr_Format(PyExc_ValueError,
                     "run() argument 'task_dump_signal' must be a signal number "
                     "from 1 to %d", NSIG - 1);
        return -1;
    }
    if (n == SIGINT || n == SIGTERM
#ifdef SIGKILL
        || n == SIGKILL || n == SIGSTOP
#endif
#ifdef SIGBREAK
        || n == SIGBREAK
#endif
        ) {
        PyErr_Format(PyExc_ValueError,
                     "run() argument 'task_dump_signal' cannot be %ld: run() stops "
                     "on SIGINT and SIGTERM, and SIGKILL and SIGSTOP cannot be caught",
                     n);
        return -1;
    }
    *signum = (int)n;
    return 0;
}

/* The watchdog settings: the parameters win over the environment, so an
 * operator can bound a service whose code says nothing.  Off the main
 * thread the environment is not read at all (the watchdog cannot run
 * there), so a malformed value cannot make run() fail there. */
static int
check_watchdog_arguments(aiorun_state *st, run_args *a, watchdog_args *w, int use_env)
{
    double deadline;
    if (check_seconds(a->shutdown_deadline, "shutdown_deadline", 0, 1, &deadline) < 0) {
        return -1;
    }
    if (deadline < 0) {
        PyObject *value = NULL;
        if (use_env && aiorun_getenv(st, DEADLINE_ENV, &value) < 0) {
            return -1;
        }
        const char *env = value ? PyBytes_AS_STRING(value) : NULL;
        deadline = 0;
        if (env != NULL && env[strspn(env, " \t")] != '\0') {
            char *end;
            deadline = strtod(env, &end);
            end += strspn(end, " \t");
            if (*end != '\0' || !isfinite(deadline) || !(deadline > 0)) {
                PyErr_Format(PyExc_ValueError,
                             "environment variable %s must be a number of seconds "
                             "> 0, not '%.100s'", DEADLINE_ENV, env);
                Py_DECREF(value);
                return -1;
            }
        }
        Py_XDECREF(value);
    }
    w->deadline = deadline;

    if (flag_or_env(st, a->exit_on_repeated_signal, "exit_on_repeated_signal",
                    use_env ? REPEATED_SIGNAL_ENV : NULL, &w->exit_on_repeat) < 0) {
        return -1;
    }
    return flag_or_env(st, a->deadline_covers_exit, "deadline_covers_exit",
                       use_env ? COVERS_EXIT_ENV : NULL, &w->covers_exit);
}

static int
check_arguments(aiorun_state *st, run_args *a, run_flags *f, int use_env)
{
    int ok;

    if (a->coro != Py_None) {
        if ((ok = is_awaitable(st, a->coro)) < 0) {
            return -1;
        }
        if (!ok) {
            return type_error("coro", "a coroutine or awaitable", a->coro);
        }
    }
    if (check_instance(a->loop, st->AbstractEventLoop, "loop",
                       "an asyncio event loop or None") < 0) {
        return -1;
    }
    if (a->shutdown_handler != Py_None && !PyCallable_Check(a->shutdown_handler)) {
        return type_error("shutdown_handler", "callable or None", a->shutdown_handler);
    }
    if (a->reload_callback != Py_None && !PyCallable_Check(a->reload_callback)) {
        return type_error("reload_callback", "callable or None", a->reload_callback);
    }
#ifdef MS_WINDOWS
    if (a->reload_callback != Py_None) {
        PyErr_SetString(PyExc_NotImplementedError,
                        "run() argument 'reload_callback' needs SIGHUP, which Windows "
                        "does not have");
        return -1;
    }
#endif
    if (a->shutdown_callback != Py_None && !PyCallable_Check(a->shutdown_callback)) {
        if ((ok = is_awaitable(st, a->shutdown_callback)) < 0) {
            return -1;
        }
        if (!ok) {
            return type_error("shutdown_callback",
                              "an awaitable, a callable taking the loop, or None",
                              a->shutdown_callback);
        }
    }
    if (a->executor_workers != Py_None) {
        if (!PyLong_Check(a->executor_workers) || PyBool_Check(a->executor_workers)) {
            return type_error("executor_workers", "int or None", a->executor_workers);
        }
        /* Beyond a C long is still a count: too many is the executor's
         * business, and below zero is the same error as -1. */
        int overflow;
        long workers = PyLong_AsLongAndOverflow(a->executor_workers, &overflow);
        if (workers == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (overflow < 0 || (overflow == 0 && workers <= 0)) {
            PyErr_SetString(PyExc_ValueError,
                            "run() argument 'executor_workers' must be greater than 0");
            return -1;
        }
    }
    if (check_instance(a->executor, st->Executor, "executor",
                       "a concurrent.futures.Executor or None") < 0) {
        return -1;
    }
    if (check_flag(a->use_uvloop, "use_uvloop", &f->use_uvloop) < 0
        || check_flag(a->stop_on_unhandled_errors, "stop_on_unhandled_errors",
                      &f->stop_on_errors) < 0
        || check_flag(a->notify_ready_on_start, "notify_ready_on_start",
                      &f->ready_on_start) < 0) {
        return -1;
    }
    if (check_seconds(a->timeout_task_shutdown, "timeout_task_shutdown", 0, 0,
                      &f->task_timeout) < 0
        || check_seconds(a->drain_delay, "drain_delay", 0, 0, &f->drain_delay) < 0
        || check_flag(a->cancel_main_first, "cancel_main_first", &f->main_first) < 0
        || check_dump_signal(a->task_dump_signal, &f->dump_signum) < 0) {
        return -1;
    }
    if (f->drain_delay < 0) {
        f->drain_delay = 0;   /* None: no drain */
    }
    return flag_or_env(st, a->reap_orphans, "reap_orphans",
                       use_env ? REAP_ORPHANS_ENV : NULL, &f->reap_orphans);
}

static PyObject *
new_loop(aiorun_state *st, int use_uvloop)
{
    if (!use_uvloop) {
        return PyObject_CallNoArgs(st->new_event_loop);
    }
    /* ImportError propagates: installing uvloop is the caller's job. */
    PyObject *uvloop = PyImport_ImportModule("uvloop");
    if (uvloop == NULL) {
        return NULL;
    }
    PyObject *loop = PyObject_CallMethod(uvloop, "new_event_loop", NULL);
    Py_DECREF(uvloop);
    return loop;
}

/* Install the exception handler for stop_on_unhandled_errors. */
static int
install_exception_handler(RunObject *run, int stop_on_errors)
{
    PyObject *current = PyObject_CallMethod(run->loop, "get_exception_handler", NULL);
    if (current == NULL) {
        return -1;
    }
    int has_handler = current != Py_None;
    Py_DECREF(current);
    if (!stop_on_errors) {
        return 0;
    }
    if (has_handler) {
        PyErr_SetString(PyExc_Exception,
            "If you provide a loop instance, and you've configured a custom "
            "exception handler on it, then the 'stop_on_unhandled_errors' "
            "parameter is unavailable (all exceptions will be handled).");
        return -1;
    }
    PyObject *handler = aiorun_run_method(run, "_exception_handler");
    if (handler == NULL) {
        return -1;
    }
    PyObject *res = PyObject_CallMethod(run->loop, "set_exception_handler", "O", handler);
    Py_DECREF(handler);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    run->handler_installed = 1;
    return 0;
}

/* Schedule coro as the main task; keep it and watch it for errors. */
static int
start_main_task(RunObject *run, PyObject *coro)
{
    aiorun_state *st = run->state;
    PyObject *args = PyTuple_Pack(1, coro);
    PyObject *kwargs = args ? Py_BuildValue("{OO}", st->s_loop, run->loop) : NULL;
    if (kwargs == NULL) {
        Py_XDECREF(args);
        return -1;
    }
    run->main_task = PyObject_Call(st->ensure_future, args, kwargs);
    Py_DECREF(args);
    Py_DECREF(kwargs);
    if (run->main_task == NULL) {
        return -1;
    }
    PyObject *watch = aiorun_run_method(run, "_main_done");
    if (watch == NULL) {
        return -1;
    }
    PyObject *res = PyObject_CallMethodOneArg(run->main_task, st->s_add_done_callback,
                                              watch);
    Py_DECREF(watch);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* executor, or a new ThreadPoolExecutor; becomes the loop's default. */
static PyObject *
set_up_executor(RunObject *run, run_args *a)
{
    aiorun_state *st = run->state;
    PyObject *executor;
    if (a->executor != Py_None) {
        executor = Py_NewRef(a->executor);
    }
    else {
        if (aiorun_log(st, LOG_DEBUG, "Creating default executor") < 0) {
            return NULL;
        }
        /* Imported here, not with aiorun: it costs `import aiorun` more
         * than the rest of the module, and many runs pass an executor.  Not
         * kept in the module state: runs on other threads would race to
         * set it, and sys.modules has it after the first import. */
        PyObject *module = PyImport_ImportModule("concurrent.futures.thread");
        PyObject *pool_type = module ? PyObject_GetAttrString(module, "ThreadPoolExecutor")
                                     : NULL;
        Py_XDECREF(module);
        PyObject *args = pool_type ? PyTuple_New(0) : NULL;
        PyObject *kwargs = args ? Py_BuildValue("{sO}", "max_workers",
                                                a->executor_workers) : NULL;
        executor = kwargs ? PyObject_Call(pool_type, args, kwargs) : NULL;
        Py_XDECREF(pool_type);
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
        if (executor == NULL) {
            return NULL;
        }
    }
    PyObject *res = PyObject_CallMethod(run->loop, "set_default_executor", "O", executor);
    if (res == NULL) {
        Py_DECREF(executor);
        return NULL;
    }
    Py_DECREF(res);
    return executor;
}

/* Run the loop until it stops.  0 when the shutdown should follow, -1 when
 * the loop itself failed (an Exception out of run_forever() is asyncio's or
 * the loop's own: the app's are given to the exception handler).  A
 * KeyboardInterrupt is a shutdown request; a SystemExit (or any other
 * BaseException) from the app is re-raised after the shutdown. */
static int
run_loop(RunObject *run)
{
    if (aiorun_signals_wake_loop(run) < 0) {
        return -1;
    }
    run->phase = PHASE_RUNNING;
    aiorun_run_stage(run, STAGE_RUNNING);
    PyObject *res = PyObject_CallMethod(run->loop, "run_forever", NULL);
    int interrupted = res == NULL && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
    PyObject *escaped = NULL;
    if (res == NULL && !interrupted && !PyErr_ExceptionMatches(PyExc_Exception)) {
        escaped = aiorun_take_error();
    }
    run->phase = PHASE_SHUTDOWN;
    run->shutdown_requested = 1;
    aiorun_run_request(run, interrupted ? CAUSE_KEYBOARD_INTERRUPT
                            : escaped ? CAUSE_UNHANDLED_ERROR : CAUSE_LOOP_STOPPED, 0);
    aiorun_run_stage(run, STAGE_SHUTDOWN);
    if (res != NULL) {
        Py_DECREF(res);
        return 0;
    }
    if (escaped != NULL) {
        aiorun_keep_exception(run, escaped, "%s escaped the event loop; the exception "
                              "reported before it is re-raised after the shutdown",
                              Py_TYPE(escaped)->tp_name);
        return 0;
    }
    if (!interrupted) {
        return -1;
    }
    PyErr_Clear();
    if (aiorun_log(run->state, LOG_INFO, "Got KeyboardInterrupt") < 0) {
        /* A logging filter that raises: the shutdown goes on, and re-raises
         * it at the end. */
        aiorun_keep_exception(run, aiorun_take_error(), "%s raised an error as the loop "
                              "stopped; an earlier one is re-raised after the shutdown",
                              "The \"aiorun\" logger");
    }
    return 0;
}

/* A set-up step or the shutdown failed after run() made its own loop: close
 * it so the failure leaves nothing behind.  Keeps the exception that is set. */
static void
discard_own_loop(RunObject *run)
{
    if (!run->own_loop || run->loop == NULL) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int closed = aiorun_loop_says(run->loop, "is_closed");
    PyObject *res = closed < 0 ? NULL
        : closed == 0 ? PyObject_CallMethod(run->loop, "close", NULL) : Py_NewRef(Py_None);
    if (res != NULL) {
        Py_DECREF(res);
        res = PyObject_CallOneArg(run->state->set_event_loop, Py_None);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(run->loop);
    }
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
}

/* shutdown_event() finds the run() of the running loop here.  A loop some
 * other run() already drives (from another thread) keeps that one. */
static int
register_run(RunObject *run)
{
    PyObject *runs = run->state->runs;
    PyObject *other = PyDict_SetDefault(runs, run->loop, (PyObject *)run);
    return other == NULL ? -1 : 0;
}

static void
unregister_run(RunObject *run)
{
    PyObject *runs = run->state->runs;
    if (run->loop == NULL) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *found;
    int rc = PyDict_GetItemRef(runs, run->loop, &found);
    if (rc > 0 && found == (PyObject *)run) {
        rc = PyDict_DelItem(runs, run->loop);
    }
    Py_XDECREF(found);
    if (rc < 0) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    PyErr_Restore(type, value, tb);
}

/* Everything after the argument checks. */
static PyObject *
run_with_signals(RunObject *run, run_args *a, run_flags *f)
{
    aiorun_state *st = run->state;
    PyObject *executor = NULL, *result = NULL;

    if (a->loop != Py_None && f->use_uvloop) {
        PyErr_SetString(PyExc_Exception,
                        "'loop' and 'use_uvloop' parameters are mutually exclusive. "
                        "(Just make your own uvloop and pass it in).");
        return NULL;
    }
    if (a->loop == Py_None) {
        run->loop = new_loop(st, f->use_uvloop);
        if (run->loop == NULL) {
            return NULL;
        }
        run->own_loop = 1;
        PyObject *res = PyObject_CallOneArg(st->set_event_loop, run->loop);
        if (res == NULL) {
            goto fail;
        }
        Py_DECREF(res);
    }
    else {
        run->loop = Py_NewRef(a->loop);
    }
    aiorun_signals_loop_ready(run);
    aiorun_watchdog_loop_ready(run);
    if (register_run(run) < 0 || install_exception_handler(run, f->stop_on_errors) < 0) {
        goto fail;
    }
    run->drain_delay = f->drain_delay;
    run->task_timeout = f->task_timeout;
    run->main_first = f->main_first;
    run->dump_signum = f->dump_signum;
    if (aiorun_taskdump_install(run) < 0) {
        goto fail;
    }
    /* Before the main task exists: a loop that refuses the executor
     * (3.11+ takes only a ThreadPoolExecutor) fails run() with that error
     * alone, and the coroutine is closed, never left pending. */
    executor = set_up_executor(run, a);
    if (executor == NULL) {
        goto fail;
    }
    /* Before the main task: a loop that refuses the heartbeat's timer
     * fails run() with the coroutine closed, never left pending. */
    if (aiorun_health_loop_ready(run) < 0) {
        goto fail;
    }
    if (a->coro != Py_None && start_main_task(run, a->coro) < 0) {
        goto fail;
    }
    if (f->reap_orphans && aiorun_reaper_start(run) < 0) {
        goto fail;
    }
    if (aiorun_notify_loop_ready(run, f->ready_on_start) < 0) {
        goto fail;
    }
#ifdef MS_WINDOWS
    {
        PyObject *wake = aiorun_run_windows_wakeup((PyObject *)run, NULL);
        if (wake == NULL) {
            goto fail;
        }
        Py_DECREF(wake);
    }
#endif
    if (run_loop(run) < 0) {
        goto done;
    }
    result = aiorun_shutdown(run, a->shutdown_callback, executor,
                             a->timeout_task_shutdown);
    if (result == NULL) {
        /* A shutdown that failed half-way (MemoryError) still leaves no
         * open loop behind as the current one. */
        discard_own_loop(run);
    }
    goto done;
fail:
    discard_own_loop(run);
done:
    Py_XDECREF(executor);
    return result;
}

/* A main task that outlives run() (it refused to exit, on a loop the
 * caller keeps) must not call into the finished run() when it ends. */
static void
forget_main_task(RunObject *run)
{
    if (run->main_task == NULL) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *task = Py_NewRef(run->main_task);
    PyObject *watch = aiorun_run_method(run, "_main_done");
    PyObject *res = watch ? PyObject_CallMethodOneArg(task, run->state->s_remove_done_callback,
                                                      watch) : NULL;
    if (res == NULL) {
        PyErr_WriteUnraisable(task);
    }
    Py_XDECREF(res);
    Py_XDECREF(watch);
    Py_DECREF(task);
    PyErr_Restore(type, value, tb);
}

/* Take our exception handler off the loop: a loop left open for its owner
 * must not call into a finished run(). */
static void
remove_exception_handler(RunObject *run)
{
    if (!run->handler_installed) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = PyObject_CallMethod(run->loop, "set_exception_handler", "O", Py_None);
    if (res == NULL) {
        PyErr_WriteUnraisable(run->loop);
    }
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
}

/* Refuses a call from inside a running loop, before anything is touched,
 * and notes whether this is the main thread (the only one signals reach). */
static int
check_thread(aiorun_state *st, int *on_main)
{
    PyObject *running = PyObject_CallNoArgs(st->get_running_loop);
    if (running == NULL) {
        return -1;
    }
    Py_DECREF(running);
    if (running != Py_None) {
        PyErr_SetString(PyExc_RuntimeError,
                        "run() cannot be called from a running event loop");
        return -1;
    }
    PyObject *main = PyObject_CallNoArgs(st->main_thread);
    PyObject *current = main ? PyObject_CallNoArgs(st->current_thread) : NULL;
    if (current != NULL) {
        /* compared while both are held.  In a subinterpreter the signal
         * module refuses handlers even on the main thread. */
        *on_main = current == main && aiorun_in_main_interpreter();
    }
    Py_XDECREF(main);
    Py_XDECREF(current);
    return current == NULL ? -1 : 0;
}

/* The ownership rule (aiorun.h): the run() on the main thread that finds
 * nobody holding the process takes it, until it returns. */
static void
claim_process(aiorun_state *st, RunObject *run, int on_main)
{
    if (on_main && st->owner == NULL) {
        st->owner = run;
        run->owns_process = 1;
        /* An earlier run() left its deadline to bound the exit, and the
         * process goes on instead: this run() owns what that did. */
        aiorun_exit_guard_retire(st);
    }
}

static void
release_process(aiorun_state *st, RunObject *run)
{
    if (run->owns_process && st->owner == run) {
        st->owner = NULL;
    }
    run->owns_process = 0;
}

#define OFF_MAIN_THREAD                                                       \
    "run() is not in the main thread, so SIGINT and SIGTERM are left alone: " \
    "stop it with loop.stop() (from another thread, "                         \
    "loop.call_soon_threadsafe(loop.stop))"
#define IN_SUBINTERPRETER                                                     \
    "run() is in a subinterpreter, where the signal module takes no "         \
    "handlers, so SIGINT and SIGTERM are left alone: stop it with "           \
    "loop.stop() (from another thread, loop.call_soon_threadsafe(loop.stop))"
#define NESTED                                                                \
    "run() is called while another run() is under way on the main thread; "  \
    "that one keeps SIGINT, SIGTERM and the rest of the process: stop this "  \
    "one with loop.stop()"

/* Why this run() does not own the process, for its WARNING. */
static const char *
not_owner_reason(int on_main)
{
    return on_main ? NESTED
        : aiorun_in_main_interpreter() ? OFF_MAIN_THREAD : IN_SUBINTERPRETER;
}

/* The watchdog, the dump signal and the reaper belong to the process
 * (aiorun.h): asking a run() that does not own it for one is an error,
 * and the environment variables do not apply to it. */
static int
check_owner_only(RunObject *run, int on_main, run_args *a, watchdog_args *w,
                 run_flags *f)
{
    if (run->owns_process) {
        return 0;
    }
    const char *asked = a->shutdown_deadline != Py_None ? "shutdown_deadline"
        : a->exit_on_repeated_signal != Py_None && w->exit_on_repeat
            ? "exit_on_repeated_signal"
        : a->task_dump_signal != Py_None && a->task_dump_signal != Py_False
            ? "task_dump_signal"
        : a->reap_orphans != Py_None && f->reap_orphans ? "reap_orphans"
        : a->reload_callback != Py_None ? "reload_callback"
        : a->deadline_covers_exit != Py_None && w->covers_exit ? "deadline_covers_exit"
        : a->health != Py_None ? "health"
        : a->shutdown_report != Py_None ? "shutdown_report"
        : NULL;
    if (asked != NULL) {
        PyErr_Format(PyExc_ValueError, on_main
                     ? "run() argument '%s' needs the outermost run(): another "
                       "run() under way on the main thread owns the process"
                     : "run() argument '%s' needs run() in the main thread", asked);
        return -1;
    }
    w->deadline = 0;
    w->exit_on_repeat = 0;
    w->covers_exit = 0;
    f->reap_orphans = 0;
    return 0;
}

/* A coroutine that run() refused before making it a task is closed, as
 * asyncio.run() does: the user sees the error, not also "coroutine 'main'
 * was never awaited".  Keeps the exception that is set. */
static void
close_refused(PyObject *coro)
{
    if (coro == NULL || !PyCoro_CheckExact(coro)) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = PyObject_CallMethod(coro, "close", NULL);
    if (res == NULL) {
        PyErr_WriteUnraisable(coro);
    }
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
}

/* run() once its arguments are parsed. */
static PyObject *
run_body(PyObject *module, RunObject *run, run_args *a, watchdog_args *w,
           run_flags *f, aiorun_held_signals *held)
{
    aiorun_state *st = run->state;
    PyObject *result = NULL;
    aiorun_health_args health = {NULL, NULL, 0};
    run->shutdown_handler = a->shutdown_handler != Py_None
        ? Py_NewRef(a->shutdown_handler)
        : PyObject_GetAttrString(module, "_shutdown_handler");
    if (run->shutdown_handler == NULL) {
        goto done;
    }
    int on_main = 0;
    if (check_thread(st, &on_main) < 0) {
        goto done;
    }
    claim_process(st, run, on_main);
    /* SIGHUP is taken with the others when there is a callback for it; a
     * bad one is refused below, with the handlers given back. */
    if (run->owns_process && a->reload_callback != Py_None
        && PyCallable_Check(a->reload_callback)) {
        run->reload_callback = Py_NewRef(a->reload_callback);
    }
    /* First of all, so that a signal arriving from here on is neither
     * fatal nor lost; until now it was held back. */
    int taken = aiorun_signals_take_over(run);
    aiorun_signals_release(held, 0);
    if (taken < 0) {
        goto done;
    }
    if (aiorun_log(st, LOG_DEBUG, "Entering run()") == 0
        && (run->owns_process
            || aiorun_log(st, LOG_WARNING, not_owner_reason(on_main)) == 0)
        && check_arguments(st, a, f, run->owns_process) == 0
        && check_watchdog_arguments(st, a, w, run->owns_process) == 0
        && aiorun_health_check(st, a->health, a->liveness_timeout, run->owns_process,
                               &health) == 0
        && check_owner_only(run, on_main, a, w, f) == 0
        && aiorun_report_configure(run, a->shutdown_report, run->owns_process) == 0
        && ((w->deadline == 0 && !w->exit_on_repeat)
            || aiorun_watchdog_start(run, w->deadline, w->exit_on_repeat,
                                     f->dump_signum) == 0)
        && (!run->owns_process || aiorun_notify_start(run, f->task_timeout) == 0)
        && (!run->owns_process || aiorun_health_start(run, &health) == 0)) {
        result = run_with_signals(run, a, f);
    }
    Py_CLEAR(health.address);
    forget_main_task(run);
    aiorun_reaper_stop(run);
    aiorun_notify_stop(run);
    aiorun_health_stop(run);
    if (w->covers_exit) {
        aiorun_watchdog_hand_over(run);
    }
    else {
        aiorun_watchdog_stop(run);
    }
    unregister_run(run);
    aiorun_signals_unwake_loop(run);
    remove_exception_handler(run);
    run->phase = PHASE_DONE;
    aiorun_signals_restore(run);
    release_process(st, run);
    /* A Python signal handler that raised while the handlers were given
     * back: its exception is what run() raises. */
    if (result != NULL && PyErr_Occurred()) {
        Py_CLEAR(result);
    }
done:
    release_process(st, run);
    if (result == NULL && run->main_task == NULL) {
        close_refused(a->coro);
    }
    aiorun_report_free(run);
    /* Break the cycles through the loop and the tasks at once. */
    (void)aiorun_run_clear(run);
    return result;
}

static PyObject *
run_holding_signals(PyObject *module, PyObject *args, PyObject *kwargs,
                    aiorun_held_signals *held)
{
    static char *kwlist[] = {
        "coro", "loop", "shutdown_handler", "shutdown_callback", "executor_workers",
        "executor", "use_uvloop", "stop_on_unhandled_errors", "timeout_task_shutdown",
        "shutdown_deadline", "exit_on_repeated_signal", "notify_ready_on_start",
        "drain_delay", "cancel_main_first", "task_dump_signal", "reap_orphans",
        "reload_callback", "deadline_covers_exit", "health", "liveness_timeout",
        "shutdown_report", NULL,
    };
    aiorun_state *st = aiorun_get_state(module);
    run_args a = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None,
                  Py_False, Py_False, NULL, Py_None, Py_None, Py_True,
                  Py_None, Py_False, Py_None, Py_None, Py_None, Py_None,
                  Py_None, Py_None, Py_None};
    watchdog_args w = {0, 0, 0};
    run_flags f = {0, 0, 1, -1, 0, 0, 0, 0};
    PyObject *result = NULL;

    if (aiorun_check_call("run", args, kwargs, kwlist, 1, 0) < 0
        || !PyArg_ParseTupleAndKeywords(args, kwargs, "|O$OOOOOOOOOOOOOOOOOOOO:run", kwlist,
                                     &a.coro, &a.loop, &a.shutdown_handler,
                                     &a.shutdown_callback, &a.executor_workers,
                                     &a.executor, &a.use_uvloop,
                                     &a.stop_on_unhandled_errors,
                                     &a.timeout_task_shutdown, &a.shutdown_deadline,
                                     &a.exit_on_repeated_signal,
                                     &a.notify_ready_on_start, &a.drain_delay,
                                     &a.cancel_main_first, &a.task_dump_signal,
                                     &a.reap_orphans, &a.reload_callback,
                                     &a.deadline_covers_exit, &a.health,
                                     &a.liveness_timeout, &a.shutdown_report)) {
        return NULL;
    }
    PyObject *default_timeout = NULL;
    if (a.timeout_task_shutdown == NULL) {
        default_timeout = a.timeout_task_shutdown = PyLong_FromLong(60);
        if (default_timeout == NULL) {
            return NULL;
        }
    }
    RunObject *run = aiorun_run_new(st);
    if (run == NULL) {
        Py_XDECREF(default_timeout);
        return NULL;
    }
    result = run_body(module, run, &a, &w, &f, held);
    Py_DECREF(run);
    Py_XDECREF(default_timeout);
    return result;
}

PyObject *
aiorun_run(PyObject *module, PyObject *args, PyObject *kwargs)
{
    /* A signal from the first instruction on waits for our handler
     * (signals.c says why). */
    aiorun_state *st = aiorun_get_state(module);
    aiorun_held_signals held;
    aiorun_signals_hold(&held, aiorun_thread_ident() == st->main_thread_ident
                                   && aiorun_in_main_interpreter());
    PyObject *result = run_holding_signals(module, args, kwargs, &held);
    aiorun_signals_release(&held, 0);
    return result;
}

/* The error that is set, with `earlier` (consumed; may be NULL) as its
 * __context__, so that neither is lost.  Returns NULL. */
static PyObject *
chain_error(PyObject *earlier)
{
    if (earlier == NULL) {
        return NULL;
    }
    PyObject *exc = aiorun_take_error();
    if (exc == NULL) {
        aiorun_restore_error(earlier);
        return NULL;
    }
    PyException_SetContext(exc, earlier);   /* steals earlier */
    aiorun_restore_error(exc);
    return NULL;
}

PyObject *
aiorun_default_shutdown_handler(PyObject *module, PyObject *loop)
{
    aiorun_state *st = aiorun_get_state(module);
    /* The loop is stopped even when a logging filter or handler raises on
     * the way: a handler that did not stop it would leave the service
     * running, with every later signal ignored.  The first error is raised
     * after the stop. */
    PyObject *error = NULL;
    if (aiorun_log(st, LOG_DEBUG, "Entering shutdown handler") < 0) {
        error = aiorun_take_error();
    }
    if (loop == Py_None) {
        loop = PyObject_CallNoArgs(st->get_event_loop);
        if (loop == NULL) {
            return chain_error(error);
        }
    }
    else {
        Py_INCREF(loop);
    }
    if (aiorun_log(st, LOG_WARNING, "Stopping the loop") < 0) {
        PyObject *later = aiorun_take_error();
        if (error == NULL) {
            error = later;
        }
        else {
            Py_XDECREF(later);
        }
    }
    PyObject *res = PyObject_CallMethod(loop, "stop", NULL);
    Py_DECREF(loop);
    if (res == NULL) {
        return chain_error(error);   /* the stop's error matters most */
    }
    if (error != NULL) {
        Py_DECREF(res);
        aiorun_restore_error(error);
        return NULL;
    }
    return res;
}
