/* The shutdown watchdog: a thread of aiorun's own that bounds the shutdown.
 *
 * run() starts it only when a shutdown deadline or the repeated-signal exit
 * is asked for, and joins it before returning.  Until a shutdown is
 * requested it sleeps in poll() without the GIL, so a running app pays
 * nothing for it.  Its timing needs no GIL either: when the loop thread
 * holds the GIL forever, the deadline still ends the process.
 *
 * Once a shutdown is requested (first SIGINT/SIGTERM, loop.stop(), an
 * unhandled error) it:
 *   - after LATE_AFTER seconds, if the loop has not acted on the request,
 *     warns once where the loop thread is stuck;
 *   - when the deadline passes, or on a repeated signal if asked, writes
 *     the shutdown phase and the stack of every thread and every unfinished
 *     task to stderr, and ends the process with AIORUN_FORCED_EXIT_CODE.
 *
 * Thread stacks are dumped by faulthandler, the one stack walker CPython
 * makes safe without the GIL: it is registered on a spare real-time signal
 * that the watchdog raises in its own thread.  Work that needs Python
 * (logging, task stacks, flushing stdout) goes to a helper thread that
 * waits for the GIL; the watchdog gives it GIL_GRACE seconds and goes on
 * without it. */
#include "aiorun.h"  /* Python.h first: it sets _GNU_SOURCE and friends */

#ifndef MS_WINDOWS

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LATE_AFTER 1.0      /* seconds before the late-signal warning */
/* After run(): the least time an exit gets once it has begun. */
#define EXIT_GRACE 1.0
#define GIL_GRACE 0.25      /* seconds the helper gets to take the GIL */
/* The forced exit ends the process at most this long after it began, even
 * when stderr is a full pipe nobody reads (a stuck log collector): its
 * writes give up, and a thread of its own calls _exit() at the end. */
#define EXIT_WITHIN 0.9
/* A late warning written straight to stderr gives up after this long. */
#define WARNING_WRITE_TIME 1.0
#define MAX_TASKS_SHOWN 100

enum { JOB_LATE = 1, JOB_FINAL = 2, JOB_STACKS = 4 };

struct aiorun_watchdog {
    RunObject *run;              /* borrowed; the helper reads only its state */
    double deadline;             /* seconds; 0 for none */
    int exit_on_repeat;
    int wake_fd;                 /* read end of the sigwake pipe */
    int dump_signum;             /* faulthandler's signal, 0 if none */
    unsigned long loop_thread;   /* threading ident of run()'s thread */
    pid_t pid;                   /* the process whose threads these are */
    unsigned long signals_base;  /* sigwake count when run() installed it */
    pthread_t thread;
    atomic_int stage;            /* aiorun_stage */
    atomic_int python_request;   /* aiorun_request_reason from Python */
    atomic_int quit;             /* run() is returning */
    atomic_int late_claimed;     /* the late warning has been given */
    atomic_int stacks_claimed;   /* the forced exit's stacks have been dumped */
    atomic_int after_run;        /* run() returned and handed it the exit */
    atomic_int exit_began;       /* ... and the interpreter has begun to exit */
    /* The forced exit writing the run's shutdown report; and run() no
     * longer letting it (deadline_covers_exit's hand-over): each sets its
     * own, then looks at the other's. */
    atomic_int report_busy;
    atomic_int report_closed;
    double exit_began_at;        /* when (written before exit_began is set) */
    /* Written by the watchdog thread before any job is handed over. */
    int requested;
    int reason;
    int signum;
    double requested_at;
    double late_ago;             /* seconds since the request, at the check */
    double write_until;          /* monotonic time after which writes give up */
    double exit_at;              /* when the exit timer ends the process */
    /* Watchdog <-> helper hand-over, under mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t helper;
    int helper_started;
    int helper_quit;
    int jobs;
    int jobs_done;
    PyObject *loop;              /* run()'s loop once it has one, under mu:
                                  * the helper reads it here, not in the
                                  * Run, which belongs to run()'s thread */
};

static const char *const stage_names[] = {
    [STAGE_STARTING] = "starting (the loop has not run yet)",
    [STAGE_RUNNING] = "waiting for the event loop to act on the request",
    [STAGE_HANDLER] = "shutdown_handler called, waiting for the loop to stop",
    [STAGE_SHUTDOWN] = "entering the shutdown phase",
    [STAGE_CALLBACK] = "running shutdown_callback",
    [STAGE_DRAINING] = "letting tasks finish before cancelling them (drain_delay)",
    [STAGE_CANCELLING] = "cancelling tasks",
    [STAGE_WAITING_TASKS] = "waiting for cancelled tasks to finish",
    [STAGE_EXECUTOR] = "waiting for the executor to shut down",
    [STAGE_ASYNCGENS] = "shutting down async generators",
    [STAGE_CLOSING] = "closing the loop",
    [STAGE_LEAVING] = "leaving run()",
};

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* write(2) to stderr, whole, without Python, until wd->write_until: a
 * pipe nobody reads must not hold the process.  Chunks of PIPE_BUF, each
 * after poll() says there is room, so no write() blocks on a pipe. */
static void
write_all(aiorun_watchdog *wd, const char *p, size_t left)
{
    while (left > 0) {
        double wait = wd->write_until - monotonic();
        if (wait <= 0) {
            return;
        }
        struct pollfd pfd = {.fd = STDERR_FILENO, .events = POLLOUT};
        int ready = poll(&pfd, 1, (int)(wait * 1000) + 1);
        if (ready < 0 && errno == EINTR) {
            continue;
        }
        if (ready <= 0 || (pfd.revents & (POLLERR | POLLNVAL))) {
            return;
        }
        ssize_t n = write(STDERR_FILENO, p, left < PIPE_BUF ? left : PIPE_BUF);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        p += n;
        left -= (size_t)n;
    }
}

static void
say(aiorun_watchdog *wd, const char *format, ...)
{
    char buf[1024];
    va_list args;
    va_start(args, format);
    int len = vsnprintf(buf, sizeof(buf), format, args);
    va_end(args);
    if (len > 0) {
        write_all(wd, buf, (size_t)len < sizeof(buf) ? (size_t)len : sizeof(buf) - 1);
    }
}

/* The last word of a forced exit: whatever the other threads are stuck
 * in (a blocking write of faulthandler's, the GIL), this one ends the
 * process on time. */
static void *
exit_timer_main(void *arg)
{
    const double *at = arg;
    struct timespec ts;
    double left = *at - monotonic();
    if (left > 0) {
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
    _exit(AIORUN_FORCED_EXIT_CODE);
    return NULL;
}

static const char *
signal_name(int signum)
{
    switch (signum) {
    case SIGINT:
        return "SIGINT";
    case SIGTERM:
        return "SIGTERM";
    default:
        return "a signal";
    }
}

static const char *
reason_text(const aiorun_watchdog *wd)
{
    switch (wd->reason) {
    case REQUEST_SIGNAL:
        return signal_name(wd->signum);
    case REQUEST_LOOP_STOPPED:
        return "loop.stop()";
    default:
        return "an unhandled error";
    }
}

#define AFTER_RUN_STAGE                                                        \
    "run() returned; waiting for the process to exit (atexit handlers, threads " \
    "that are not daemons)"

static const char *
stage_text(const aiorun_watchdog *wd)
{
    if (atomic_load((atomic_int *)&wd->after_run)) {
        return AFTER_RUN_STAGE;
    }
    int stage = atomic_load(&wd->stage);
    if (stage < 0 || stage > STAGE_LEAVING) {
        return "unknown";
    }
    return stage_names[stage];
}

static int handler_installed(int signum);

/* ---- the helper: everything that needs the GIL ---- */

#ifdef Py_GIL_DISABLED
/* faulthandler.dump_traceback(file=fd, all_threads=True): faulthandler
 * stops the world while it reads the threads (3.13.2 and later).  On a
 * free-threaded build nothing else keeps a running thread's frames still
 * while another thread walks them.  0, or -1 with an exception. */
static int
dump_all_threads_stopped(PyObject *fd)
{
    PyObject *faulthandler = PyImport_ImportModule("faulthandler");
    PyObject *res = faulthandler
        ? PyObject_CallMethod(faulthandler, "dump_traceback", "OO", fd, Py_True) : NULL;
    Py_XDECREF(faulthandler);
    Py_XDECREF(res);
    return res ? 0 : -1;
}

/* The stack of thread `ident` as faulthandler writes it (most recent call
 * first), through a temporary file; NULL with an exception. */
static PyObject *
stopped_thread_stack(unsigned long ident)
{
    PyObject *tempfile = PyImport_ImportModule("tempfile");
    PyObject *file = tempfile ? PyObject_CallMethod(tempfile, "TemporaryFile", NULL) : NULL;
    Py_XDECREF(tempfile);
    if (file == NULL) {
        return NULL;
    }
    PyObject *fd = PyObject_CallMethod(file, "fileno", NULL);
    PyObject *data = NULL, *text = NULL, *found = NULL;
    PyObject *res = fd && dump_all_threads_stopped(fd) == 0
        ? PyObject_CallMethod(file, "seek", "i", 0) : NULL;
    data = res ? PyObject_CallMethod(file, "read", NULL) : NULL;
    Py_XDECREF(res);
    text = data ? PyUnicode_FromEncodedObject(data, "utf-8", "backslashreplace") : NULL;
    Py_XDECREF(fd);
    Py_XDECREF(data);
    /* close() is Python code: not called with an exception set. */
    PyObject *exc = aiorun_take_error();
    res = PyObject_CallMethod(file, "close", NULL);
    if (res == NULL) {
        PyErr_Clear();   /* the dump is read already */
    }
    Py_XDECREF(res);
    Py_DECREF(file);
    if (exc != NULL) {
        aiorun_restore_error(exc);
    }
    if (text == NULL) {
        return NULL;
    }
    /* faulthandler heads each thread "Thread 0x<ident> (most recent call
     * first):" and ends it with a blank line. */
    char head[64];
    snprintf(head, sizeof(head), "Thread 0x%0*lx", (int)(sizeof(unsigned long) * 2), ident);
    const char *all = PyUnicode_AsUTF8(text);
    const char *start = all ? strstr(all, head) : NULL;
    if (start != NULL) {
        const char *body = strchr(start, '\n');
        const char *end = body ? strstr(body + 1, "\n\n") : NULL;
        found = body ? PyUnicode_FromStringAndSize(
                           body + 1, end ? end - body : (Py_ssize_t)strlen(body + 1))
                     : NULL;
    }
    else if (all != NULL) {
        found = PyUnicode_FromString("  (no Python frame)\n");
    }
    Py_DECREF(text);
    return found;
}
#endif

/* Log, once, where the loop thread is while it ignores the request. */
static void
helper_late_warning(aiorun_watchdog *wd)
{
    RunObject *run = wd->run;
    PyObject *frames = NULL, *chain = NULL, *text = NULL, *message = NULL;

    if (atomic_exchange(&wd->late_claimed, 1)
        || atomic_load(&wd->stage) > STAGE_RUNNING) {
        return;  /* given already, or the loop got to it meanwhile */
    }
#ifdef Py_GIL_DISABLED
    text = stopped_thread_stack(wd->loop_thread);
    const char *order = "first";
#else
    /* sys._current_frames is an app's to replace (some copy
     * threading._active into it): what it returns is checked, never
     * trusted to be a dict of frames (aiorun_frame_chain checks those). */
    PyObject *sys_frames = aiorun_sys_attr("_current_frames");
    frames = sys_frames ? PyObject_CallNoArgs(sys_frames) : NULL;
    Py_XDECREF(sys_frames);
    if (frames != NULL && !PyDict_Check(frames)) {
        PyErr_Format(PyExc_TypeError, "sys._current_frames() returned %.200s, not a dict",
                     Py_TYPE(frames)->tp_name);
        Py_CLEAR(frames);
    }
    PyObject *key = frames ? PyLong_FromUnsignedLong(wd->loop_thread) : NULL;
    PyObject *frame = NULL;
    int found = key ? PyDict_GetItemRef(frames, key, &frame) : -1;
    Py_XDECREF(key);
    if (found > 0) {
        chain = aiorun_frame_chain(frame);
        text = chain ? aiorun_format_frames(chain) : NULL;
    }
    else if (found == 0) {
        text = PyUnicode_FromString("  (no Python frame)\n");
    }
    Py_XDECREF(frame);
    if (text == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_AttributeError, "sys has no _current_frames");
    }
    if (text == NULL) {
        /* The warning is still given, with a note instead of the stack. */
        PyObject *why = aiorun_take_error();
        text = why ? PyUnicode_FromFormat("  (its stack cannot be shown: %.200s: %S)\n",
                                          Py_TYPE(why)->tp_name, why) : NULL;
        Py_XDECREF(why);
    }
    const char *order = "last";
#endif
    if (text != NULL) {
        char ago[32];
        snprintf(ago, sizeof(ago), "%.1f", wd->late_ago);
        message = PyUnicode_FromFormat(
            "Shutdown requested %s s ago by %s, but the event loop has not "
            "acted on it: its thread is blocked here (most recent call %s):\n%U",
            ago, reason_text(wd), order, text);
    }
    if (message == NULL
        || aiorun_log_exc(run->state, LOG_WARNING, "%s", message, NULL) < 0) {
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable((PyObject *)run);
        }
    }
    Py_XDECREF(frames);
    Py_XDECREF(chain);
    Py_XDECREF(text);
    Py_XDECREF(message);
}

static void
flush_stream(const char *name)
{
    /* Ours: flush() may replace sys.stderr and drop the old one. */
    PyObject *stream = aiorun_sys_attr(name);
    if (stream == NULL || stream == Py_None) {
        PyErr_Clear();
        Py_XDECREF(stream);
        return;
    }
    PyObject *res = PyObject_CallMethod(stream, "flush", NULL);
    Py_DECREF(stream);
    if (res == NULL) {
        PyErr_Clear();  /* a closed stream has nothing to lose */
    }
    Py_XDECREF(res);
}

/* The unfinished tasks of the loop, as text; NULL with an exception. */
static PyObject *
describe_tasks(aiorun_state *st, PyObject *loop)
{
    PyObject *tasks = aiorun_all_tasks(st, loop);
    if (tasks == NULL) {
        return NULL;
    }
    PyObject *parts = PyList_New(0);
    Py_ssize_t shown = 0, pending = 0;
    for (Py_ssize_t i = 0; parts && i < PyList_GET_SIZE(tasks); i++) {
        PyObject *task = PyList_GET_ITEM(tasks, i);
        int done = aiorun_call_predicate(task, st->s_done);
        if (done != 0) {
            if (done < 0) {
                Py_CLEAR(parts);
            }
            continue;
        }
        if (++pending > MAX_TASKS_SHOWN) {
            continue;
        }
        shown++;
        PyObject *part = aiorun_format_task(task);
        if (part == NULL || PyList_Append(parts, part) < 0) {
            Py_CLEAR(parts);
        }
        Py_XDECREF(part);
    }
    Py_DECREF(tasks);
    if (parts == NULL) {
        return NULL;
    }
    PyObject *head = PyUnicode_FromFormat(
        "Unfinished asyncio tasks: %zd (most recent call last):\n", pending);
    PyObject *tail = pending > shown
        ? PyUnicode_FromFormat("... and %zd more\n", pending - shown)
        : PyUnicode_FromString("");
    PyObject *text = NULL;
    if (head && tail && PyList_Insert(parts, 0, head) == 0
        && PyList_Append(parts, tail) == 0) {
        PyObject *empty = PyUnicode_FromString("");
        text = empty ? PyUnicode_Join(empty, parts) : NULL;
        Py_XDECREF(empty);
    }
    Py_XDECREF(head);
    Py_XDECREF(tail);
    Py_DECREF(parts);
    return text;
}

/* Before the process ends: flush what Python buffered, then the tasks. */
static void
helper_final_report(aiorun_watchdog *wd)
{
    RunObject *run = wd->run;
    flush_stream("stdout");
    flush_stream("stderr");
    pthread_mutex_lock(&wd->mu);
    PyObject *loop = Py_XNewRef(wd->loop);
    pthread_mutex_unlock(&wd->mu);
    if (loop == NULL) {
        return;
    }
    PyObject *text = describe_tasks(run->state, loop);
    Py_DECREF(loop);
    PyObject *bytes = text ? PyUnicode_AsEncodedString(text, "utf-8", "backslashreplace")
                           : NULL;
    if (bytes == NULL) {
        PyErr_WriteUnraisable((PyObject *)run);
    }
    else {
        write_all(wd, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    }
    Py_XDECREF(text);
    Py_XDECREF(bytes);
}

void
aiorun_block_signals(int keep)
{
    sigset_t set;
    sigfillset(&set);
    /* Faults must still reach faulthandler or kill the process. */
    sigdelset(&set, SIGSEGV);
    sigdelset(&set, SIGBUS);
    sigdelset(&set, SIGFPE);
    sigdelset(&set, SIGILL);
    sigdelset(&set, SIGABRT);
    if (keep > 0) {
        sigdelset(&set, keep);
    }
    pthread_sigmask(SIG_SETMASK, &set, NULL);
}

/* Named by its creator, so the name is there as soon as the thread is
 * (top -H, py-spy and /proc show it). */
static void
name_thread(pthread_t thread, const char *name)
{
#ifdef __linux__
    pthread_setname_np(thread, name);
#else
    (void)thread;
    (void)name;
#endif
}

static void *
helper_main(void *arg)
{
    aiorun_watchdog *wd = arg;
    aiorun_block_signals(wd->dump_signum);   /* JOB_STACKS raises it here */
    pthread_mutex_lock(&wd->mu);
    for (;;) {
        while (!(wd->jobs & ~wd->jobs_done) && !wd->helper_quit) {
            pthread_cond_wait(&wd->cv, &wd->mu);
        }
        int todo = wd->jobs & ~wd->jobs_done;
        if (!todo) {
            break;
        }
        pthread_mutex_unlock(&wd->mu);
        PyGILState_STATE gil = PyGILState_Ensure();
        if (!atomic_load(&wd->quit)) {  /* else run() is returning: moot */
            /* With the GIL held here, no thread is changing its frames
             * while faulthandler walks them.  A free-threaded build has no
             * GIL: faulthandler's dump_traceback() stops the world there. */
            if ((todo & JOB_STACKS) && !atomic_exchange(&wd->stacks_claimed, 1)) {
#ifdef Py_GIL_DISABLED
                PyObject *fd = PyLong_FromLong(STDERR_FILENO);
                if (fd == NULL || dump_all_threads_stopped(fd) < 0) {
                    PyErr_WriteUnraisable(NULL);
                }
                Py_XDECREF(fd);
#else
                if (handler_installed(wd->dump_signum)) {
                    raise(wd->dump_signum);
                }
                else {
                    say(wd, "(thread stacks unavailable: faulthandler's signal has "
                            "no handler)\n");
                }
#endif
            }
            if (todo & JOB_LATE) {
                helper_late_warning(wd);
            }
            if (todo & JOB_FINAL) {
                helper_final_report(wd);
            }
        }
        PyGILState_Release(gil);
        pthread_mutex_lock(&wd->mu);
        wd->jobs_done |= todo;
        pthread_cond_broadcast(&wd->cv);
    }
    pthread_mutex_unlock(&wd->mu);
    return NULL;
}

/* Hand a job to the helper and wait up to GIL_GRACE for it.  1 when it was
 * done, 0 when the helper could not get the GIL in time (or not start). */
static int
run_job(aiorun_watchdog *wd, int job)
{
    int done = 0;
    pthread_mutex_lock(&wd->mu);
    if (!wd->helper_started) {
        if (pthread_create(&wd->helper, NULL, helper_main, wd) != 0) {
            pthread_mutex_unlock(&wd->mu);
            return 0;
        }
        wd->helper_started = 1;
        name_thread(wd->helper, "aiorun-helper");
    }
    wd->jobs |= job;
    pthread_cond_broadcast(&wd->cv);
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    long nsec = until.tv_nsec + (long)(GIL_GRACE * 1e9);
    until.tv_sec += nsec / 1000000000L;
    until.tv_nsec = nsec % 1000000000L;
    while (!(done = (wd->jobs_done & job) != 0)) {
        if (pthread_cond_timedwait(&wd->cv, &wd->mu, &until) == ETIMEDOUT) {
            done = (wd->jobs_done & job) != 0;
            break;
        }
    }
    pthread_mutex_unlock(&wd->mu);
    return done;
}

/* ---- the watchdog thread: no Python at all ---- */

static void
dump_threads(aiorun_watchdog *wd)
{
    if (wd->dump_signum == 0) {
        say(wd, "(thread stacks unavailable: no free signal for faulthandler)\n");
        return;
    }
    /* The app may have unregistered it since: raised without a handler,
     * the signal would end the process with the wrong status. */
    if (!handler_installed(wd->dump_signum)) {
        say(wd, "(thread stacks unavailable: faulthandler's signal has no handler)\n");
        return;
    }
    /* raise() returns after the handler ran in this very thread. */
    raise(wd->dump_signum);
}

static void
late_warning(aiorun_watchdog *wd, double now)
{
    if (atomic_load(&wd->after_run)) {
        return;   /* run() has returned: nothing of it is late */
    }
    wd->late_ago = now - wd->requested_at;
    if (run_job(wd, JOB_LATE) || atomic_exchange(&wd->late_claimed, 1)) {
        return;
    }
    /* The loop thread keeps the GIL: no logging is possible, so say it
     * directly, with the stacks. */
    wd->write_until = monotonic() + WARNING_WRITE_TIME;
    say(wd, "aiorun: WARNING: shutdown requested %.1f s ago by %s, but the event loop "
        "has not acted on it and its thread holds the GIL. Stacks of all "
        "threads follow.\n", wd->late_ago, reason_text(wd));
    dump_threads(wd);
}

static void
force_exit(aiorun_watchdog *wd, int repeated_signum)
{
    double now = monotonic();
    double elapsed = now - wd->requested_at;
    /* wd lives on: nothing frees it once the process is being ended. */
    wd->exit_at = now + EXIT_WITHIN;
    wd->write_until = wd->exit_at - 0.05;
    pthread_t timer;
    if (pthread_create(&timer, NULL, exit_timer_main, &wd->exit_at) == 0) {
        name_thread(timer, "aiorun-exit");
    }
    else {
        wd->write_until = now + 0.5;   /* no timer: the writes alone are bounded */
    }
    if (repeated_signum) {
        say(wd, "aiorun: %s again during the shutdown (requested by %s %.2f s ago): "
            "forcing the exit.\n", signal_name(repeated_signum), reason_text(wd),
            elapsed);
    }
    else {
        say(wd, "aiorun: the shutdown deadline of %g s passed (requested by %s %.2f s "
            "ago).\n", wd->deadline, reason_text(wd), elapsed);
    }
    say(wd, "aiorun: the shutdown was in phase: %s.\n", stage_text(wd));
    /* The report first: it is quick, and the stacks may not be. */
    atomic_store(&wd->report_busy, 1);
    if (!atomic_load(&wd->report_closed) && !atomic_load(&wd->after_run)
        && wd->run != NULL) {
        aiorun_report_forced_exit(wd->run, atomic_load(&wd->stage));
    }
    say(wd, "aiorun: stacks of all threads:\n");
    /* Walking the frames of a thread that runs Python meanwhile can crash
     * (seen: a SIGSEGV instead of exit 124 when the loop was busy logging),
     * so the helper dumps them holding the GIL.  Without the GIL in time the
     * holder is stuck, its frames stay still, and this thread dumps them. */
    if (atomic_load(&wd->after_run)) {
        /* Threads that are not daemons are joined, and atexit handlers
         * run, before the interpreter calls itself finalizing: until then
         * the helper can hold the GIL while the stacks are walked, as
         * always (walking a thread that runs Python meanwhile can crash).
         * Once finalizing, no Python at all: faulthandler's own handler
         * needs no GIL. */
        if (aiorun_is_finalizing() || wd->dump_signum == 0
            || !run_job(wd, JOB_STACKS)) {
            if (!atomic_exchange(&wd->stacks_claimed, 1)) {
                dump_threads(wd);
            }
        }
        say(wd, "aiorun: run() had returned: no task list, and Python's buffered "
            "output is not flushed.\n");
    }
    else {
        int gil_had = 1;
        if (wd->dump_signum == 0 || !(gil_had = run_job(wd, JOB_STACKS))) {
            if (!atomic_exchange(&wd->stacks_claimed, 1)) {
                dump_threads(wd);
            }
        }
        /* The grace for the GIL is given once: a holder that kept it
         * through the first job keeps it through a second wait too. */
        if (!gil_had || !run_job(wd, JOB_FINAL)) {
            say(wd, "aiorun: the GIL could not be had within %g s: task stacks and "
                "Python's buffered output are lost.\n", GIL_GRACE);
        }
    }
    say(wd, "aiorun: exiting with code %d, %.2f s after the shutdown was requested.\n",
        AIORUN_FORCED_EXIT_CODE, monotonic() - wd->requested_at);
    /* Not exit(): atexit handlers and the interpreter's own clean-up would
     * need the GIL, or the very thing that hangs. */
    _exit(AIORUN_FORCED_EXIT_CODE);
}

static void
note_request(aiorun_watchdog *wd, int reason, double now)
{
    if (wd->requested) {
        return;
    }
    wd->requested = 1;
    wd->reason = reason;
    wd->signum = aiorun_sigwake_last_signum();
    wd->requested_at = now;
    /* A signal request dates from the first signal, which this thread may
     * only see together with a later one on a busy machine. */
    double first_at;
    int first = reason == REQUEST_SIGNAL ? aiorun_sigwake_first_signum(&first_at) : 0;
    if (first != 0) {
        wd->signum = first;
        wd->requested_at = first_at;
    }
}

/* When the deadline ends the process: requested_at + deadline, and after
 * run() no sooner than EXIT_GRACE after the exit began (one whose deadline
 * passed while the process went on gets that long to exit by itself). */
static double
deadline_end(const aiorun_watchdog *wd)
{
    double end = wd->requested_at + wd->deadline;
    if (atomic_load((atomic_int *)&wd->after_run)) {
        double grace = wd->exit_began_at + EXIT_GRACE;
        if (grace > end) {
            end = grace;
        }
    }
    return end;
}

/* Milliseconds until the next thing the watchdog must do, -1 for never. */
static int
next_timeout(const aiorun_watchdog *wd, int late_done, double now)
{
    if (!wd->requested) {
        return -1;
    }
    if (atomic_load((atomic_int *)&wd->after_run)
        && !atomic_load((atomic_int *)&wd->exit_began)) {
        return -1;   /* woken when the exit begins */
    }
    double next = -1;
    if (wd->deadline > 0) {
        next = deadline_end(wd);
    }
    if (!late_done) {
        double late = wd->requested_at + LATE_AFTER;
        if (next < 0 || late < next) {
            next = late;
        }
    }
    if (next < 0) {
        return -1;
    }
    double ms = (next - now) * 1000.0 + 1.0;
    return ms <= 0 ? 0 : ms > 1e9 ? 1000000000 : (int)ms;
}

static void *
watchdog_main(void *arg)
{
    aiorun_watchdog *wd = arg;
    /* From the count at installation, not at thread start: a signal may
     * come before this thread first runs. */
    unsigned long seen = wd->signals_base;
    int late_done = 0;
    char buf[64];

    /* The mask was set by the creator; only the dump signal comes in. */
    aiorun_block_signals(wd->dump_signum);
    for (;;) {
        struct pollfd pfd = {.fd = wd->wake_fd, .events = POLLIN};
        int timeout = next_timeout(wd, late_done, monotonic());
        if (poll(&pfd, 1, timeout) > 0) {
            while (read(wd->wake_fd, buf, sizeof(buf)) > 0) {
            }
        }
        if (atomic_load(&wd->quit)) {
            break;
        }
        double now = monotonic();
        unsigned long count = aiorun_sigwake_count();
        unsigned long fresh = count - seen;
        seen = count;
        if (fresh > 0 && !wd->requested) {
            note_request(wd, REQUEST_SIGNAL, now);
            fresh--;
        }
        int python_reason = atomic_load(&wd->python_request);
        if (python_reason) {
            note_request(wd, python_reason, now);
        }
        int after_run = atomic_load(&wd->after_run);
        if (fresh > 0 && wd->exit_on_repeat && !after_run) {
            force_exit(wd, aiorun_sigwake_last_signum());
        }
        if (!wd->requested) {
            continue;
        }
        /* After run(), the deadline holds once the interpreter exits: work
         * the process goes on doing is the app's. */
        if (wd->deadline > 0 && (!after_run || atomic_load(&wd->exit_began))
            && now >= deadline_end(wd)) {
            force_exit(wd, 0);
        }
        if (!late_done && now >= wd->requested_at + LATE_AFTER) {
            late_done = 1;
            /* Not worth a warning if the deadline comes first anyway. */
            if (atomic_load(&wd->stage) <= STAGE_RUNNING
                && (wd->deadline == 0 || wd->deadline > LATE_AFTER)) {
                late_warning(wd, now);
            }
        }
    }
    return NULL;
}

/* 1 if signum has a handler (not SIG_DFL or SIG_IGN): raising it is safe. */
static int
handler_installed(int signum)
{
    struct sigaction current;
    if (sigaction(signum, NULL, &current) < 0) {
        return 0;
    }
    return (current.sa_flags & SA_SIGINFO)
        || (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN);
}

/* A real-time signal nobody uses, for faulthandler.register(); 0 if none.
 * Never `avoid`: task_dump_signal, whose handler run() installs later. */
static int
register_dump_signal(int avoid)
{
    PyObject *faulthandler = PyImport_ImportModule("faulthandler");
    if (faulthandler == NULL) {
        return -1;
    }
    int chosen = 0;
    for (int signum = SIGRTMAX; signum >= SIGRTMIN; signum--) {
        struct sigaction current;
        if (signum != avoid && sigaction(signum, NULL, &current) == 0
            && !(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_DFL) {
            chosen = signum;
            break;
        }
    }
    if (chosen != 0) {
        PyObject *res = PyObject_CallMethod(faulthandler, "register", "iiOO", chosen,
                                            STDERR_FILENO, Py_True, Py_False);
        if (res == NULL) {
            chosen = -1;
        }
        /* A faulthandler an app replaced may not have put a handler there:
         * then raise() would end the process by that signal. */
        else if (!handler_installed(chosen)) {
            chosen = 0;
        }
        Py_XDECREF(res);
    }
    Py_DECREF(faulthandler);
    return chosen;
}

static void
unregister_dump_signal(int signum)
{
    if (signum <= 0) {
        return;
    }
    PyObject *faulthandler = PyImport_ImportModule("faulthandler");
    PyObject *res = faulthandler
        ? PyObject_CallMethod(faulthandler, "unregister", "i", signum) : NULL;
    if (res == NULL) {
        PyErr_WriteUnraisable(NULL);
    }
    Py_XDECREF(faulthandler);
    Py_XDECREF(res);
}

/* Starts the watchdog's thread. */
static int
start_thread(aiorun_watchdog *wd)
{
    /* The thread starts with every signal blocked, so none lands there by
     * chance; it unblocks the dump signal itself. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&wd->thread, NULL, watchdog_main, wd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) {
        name_thread(wd->thread, "aiorun-watchdog");
    }
    return rc;
}

static int
init_sync(aiorun_watchdog *wd)
{
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        return -1;
    }
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int cv_rc = pthread_cond_init(&wd->cv, &attr);
    pthread_condattr_destroy(&attr);
    if (cv_rc != 0) {
        return -1;
    }
    if (pthread_mutex_init(&wd->mu, NULL) != 0) {
        pthread_cond_destroy(&wd->cv);
        return -1;
    }
    return 0;
}

/* In a child forked during run() (a pre-fork server, a worker), the
 * watchdog's threads stayed in the parent, and its lock may be held there.
 * The child gets threads of its own, so the deadline holds in it too: a
 * shutdown requested before the fork keeps its time, one requested after
 * counts from then.  Only when the fork came from the loop's thread: a
 * child forked from another thread does not run the loop. */
static void
watchdog_after_fork(RunObject *run)
{
    aiorun_watchdog *wd = run->watchdog;
    if (wd == NULL || wd->pid == getpid()
        || aiorun_thread_ident() != wd->loop_thread) {
        return;
    }
    /* The parent's copies may be locked: new ones, never destroyed.  On a
     * failure the pid stays the parent's, and aiorun_watchdog_stop()
     * forgets this watchdog. */
    if (init_sync(wd) < 0) {
        return;
    }
    wd->helper_started = 0;
    wd->helper_quit = 0;
    wd->jobs = wd->jobs_done = 0;
    atomic_store(&wd->late_claimed, 0);
    atomic_store(&wd->stacks_claimed, 0);
    atomic_store(&wd->report_busy, 0);
    if (aiorun_sigwake_after_fork(&wd->wake_fd, &wd->signals_base) < 0) {
        PyErr_WriteUnraisable((PyObject *)run);
        return;
    }
    if (start_thread(wd) == 0) {
        wd->pid = getpid();
    }
}

int
aiorun_register_fork_hook(aiorun_state *st)
{
    /* Only the process owner registers: no other thread at the same time. */
    if (st->fork_hook_registered) {
        return 0;
    }
    PyObject *module = PyType_GetModule((PyTypeObject *)st->RunType);
    PyObject *hook = module ? PyObject_GetAttrString(module, "_after_fork_child") : NULL;
    PyObject *os = hook ? PyImport_ImportModule("os") : NULL;
    PyObject *reg = os ? PyObject_GetAttrString(os, "register_at_fork") : NULL;
    PyObject *args = reg ? PyTuple_New(0) : NULL;
    PyObject *kwargs = args ? Py_BuildValue("{sO}", "after_in_child", hook) : NULL;
    PyObject *res = kwargs ? PyObject_Call(reg, args, kwargs) : NULL;
    Py_XDECREF(hook);
    Py_XDECREF(os);
    Py_XDECREF(reg);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    st->fork_hook_registered = 1;
    return 0;
}

PyObject *
aiorun_after_fork_child(PyObject *module, PyObject *unused)
{
    (void)unused;
    aiorun_state *st = aiorun_get_state(module);
    /* The child's own run() (if it has one) pauses it again as it needs. */
    if (st->gc_paused) {
        st->gc_paused = 0;
        PyGC_Enable();
    }
    /* Through the owner, not the runs: the endpoint starts before the run
     * is listed, and code that may fork runs in between. */
    if (st->owner != NULL) {
        aiorun_health_after_fork(st->owner);
    }
    PyObject *runs = st->runs ? PyDict_Values(st->runs) : NULL;
    if (runs == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(runs); i++) {
        watchdog_after_fork((RunObject *)PyList_GET_ITEM(runs, i));
    }
    Py_DECREF(runs);
    Py_RETURN_NONE;
}

int
aiorun_watchdog_start(RunObject *run, double deadline, int exit_on_repeat,
                      int avoid_signum)
{
    if (aiorun_register_fork_hook(run->state) < 0) {
        return -1;
    }
    aiorun_watchdog *wd = PyMem_RawCalloc(1, sizeof(*wd));
    if (wd == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    wd->run = run;
    wd->deadline = deadline;
    wd->exit_on_repeat = exit_on_repeat;
    wd->loop_thread = aiorun_thread_ident();
    wd->pid = getpid();
    atomic_init(&wd->stage, run->phase == PHASE_SETUP ? STAGE_STARTING : STAGE_RUNNING);
    atomic_init(&wd->python_request, run->shutdown_requested ? REQUEST_SIGNAL : 0);
    atomic_init(&wd->quit, 0);
    atomic_init(&wd->late_claimed, 0);
    atomic_init(&wd->stacks_claimed, 0);
    atomic_init(&wd->after_run, 0);
    atomic_init(&wd->exit_began, 0);
    atomic_init(&wd->report_busy, 0);
    atomic_init(&wd->report_closed, 0);
    if (init_sync(wd) < 0) {
        PyMem_RawFree(wd);
        PyErr_NoMemory();
        return -1;
    }
    wd->dump_signum = register_dump_signal(avoid_signum);
    if (wd->dump_signum < 0) {
        goto fail;
    }
    if (aiorun_sigwake_install(&wd->wake_fd, &wd->signals_base) < 0) {
        goto fail;
    }
    int rc = start_thread(wd);
    if (rc != 0) {
        aiorun_sigwake_uninstall();
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    run->watchdog = wd;
    return 0;
fail:
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        unregister_dump_signal(wd->dump_signum);
        PyErr_Restore(type, value, tb);
    }
    pthread_mutex_destroy(&wd->mu);
    pthread_cond_destroy(&wd->cv);
    PyMem_RawFree(wd);
    return -1;
}

/* Ends the watchdog's threads and frees it (the caller has unlinked it);
 * returns its loop reference for the caller to release, after the free.
 * In a child forked meanwhile the threads stayed in the parent, and their
 * mutex may be held there: only this process's handlers go, the rest is
 * the parent's, leaked, not freed.  Keeps any exception set. */
static PyObject *
watchdog_end(aiorun_watchdog *wd)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *loop = NULL;
    if (wd->pid != getpid()) {
        aiorun_sigwake_uninstall();
        unregister_dump_signal(wd->dump_signum);
        loop = wd->loop;
        wd->loop = NULL;
        PyErr_Restore(type, value, tb);
        return loop;
    }
    atomic_store(&wd->quit, 1);
    aiorun_sigwake_poke();
    pthread_mutex_lock(&wd->mu);
    wd->helper_quit = 1;
    pthread_cond_broadcast(&wd->cv);
    int helper = wd->helper_started;
    pthread_mutex_unlock(&wd->mu);
    /* The helper may be waiting for the GIL: let it have it to finish. */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(wd->thread, NULL);
    if (helper) {
        pthread_join(wd->helper, NULL);
    }
    Py_END_ALLOW_THREADS
    aiorun_sigwake_uninstall();
    unregister_dump_signal(wd->dump_signum);
    pthread_mutex_destroy(&wd->mu);
    pthread_cond_destroy(&wd->cv);
    loop = wd->loop;
    PyMem_RawFree(wd);
    PyErr_Restore(type, value, tb);
    return loop;
}

void
aiorun_watchdog_stop(RunObject *run)
{
    aiorun_watchdog *wd = run->watchdog;
    if (wd == NULL) {
        return;
    }
    run->watchdog = NULL;
    PyObject *loop = watchdog_end(wd);
    if (loop != NULL) {
        /* Its release may run any code: keep the caller's exception. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        Py_DECREF(loop);
        PyErr_Restore(type, value, tb);
    }
}

/* threading._register_atexit(module._exit_began), once per process:
 * 0, or -1 with an exception (a threading without it, 3.8's). */
static int
register_exit_hook(aiorun_state *st)
{
    if (st->exit_hook_registered) {
        return 0;
    }
    PyObject *module = PyType_GetModule((PyTypeObject *)st->RunType);
    PyObject *hook = module ? PyObject_GetAttrString(module, "_exit_began") : NULL;
    PyObject *threading = hook ? PyImport_ImportModule("threading") : NULL;
    PyObject *res = threading ? PyObject_CallMethod(threading, "_register_atexit", "O",
                                                    hook) : NULL;
    Py_XDECREF(hook);
    Py_XDECREF(threading);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    st->exit_hook_registered = 1;
    return 0;
}

/* deadline_covers_exit: run() is returning, and the watchdog stays to
 * bound what follows until the process exits (atexit handlers, threads
 * that are not daemons, the interpreter's end).  Its helper goes first: it
 * needs the GIL, which the interpreter's end may never give, and the run's
 * loop is let go.  Kept in the module state until the process exits, or
 * until a later run() that owns the process retires it (that process
 * evidently goes on). */
void
aiorun_watchdog_hand_over(RunObject *run)
{
    aiorun_watchdog *wd = run->watchdog;
    if (wd == NULL || wd->pid != getpid() || run->state->exit_guard != NULL) {
        aiorun_watchdog_stop(run);
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    /* The run's report is freed after this: a forced exit already writing
     * it ends the process within EXIT_WITHIN, so this thread waits. */
    atomic_store(&wd->report_closed, 1);
    pthread_mutex_lock(&wd->mu);
    wd->helper_quit = 1;
    pthread_cond_broadcast(&wd->cv);
    int helper = wd->helper_started;
    pthread_mutex_unlock(&wd->mu);
    Py_BEGIN_ALLOW_THREADS
    while (atomic_load(&wd->report_busy)) {
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
    }
    if (helper) {
        pthread_join(wd->helper, NULL);
    }
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&wd->mu);
    PyObject *loop = wd->loop;
    wd->loop = NULL;
    /* A forced exit may start a new helper: it takes the pending job and
     * ends (helper_quit stays set). */
    wd->helper_started = 0;
    wd->jobs = wd->jobs_done = 0;
    pthread_mutex_unlock(&wd->mu);
    wd->run = NULL;
    atomic_store(&wd->late_claimed, 1);
    atomic_store(&wd->after_run, 1);
    run->watchdog = NULL;
    run->state->exit_guard = wd;
    /* The deadline holds from the moment the interpreter begins to exit:
     * threading calls this before it joins the threads that are not
     * daemons, and before the atexit handlers run.  Without the hook (an
     * older threading), it holds at once. */
    if (register_exit_hook(run->state) < 0) {
        PyErr_WriteUnraisable(NULL);
        wd->exit_began_at = monotonic();
        atomic_store(&wd->exit_began, 1);
    }
    aiorun_sigwake_poke();
    Py_XDECREF(loop);
    PyErr_Restore(type, value, tb);
}

PyObject *
aiorun_exit_began(PyObject *module, PyObject *unused)
{
    (void)unused;
    aiorun_watchdog *wd = aiorun_get_state(module)->exit_guard;
    if (wd != NULL) {
        wd->exit_began_at = monotonic();
        atomic_store(&wd->exit_began, 1);
        aiorun_sigwake_poke();
    }
    Py_RETURN_NONE;
}

void
aiorun_exit_guard_retire(aiorun_state *st)
{
    aiorun_watchdog *wd = st->exit_guard;
    if (wd == NULL) {
        return;
    }
    st->exit_guard = NULL;
    /* The hand-over let go of the loop already. */
    (void)watchdog_end(wd);
}

void
aiorun_watchdog_loop_ready(RunObject *run)
{
    aiorun_watchdog *wd = run->watchdog;
    if (wd == NULL || run->loop == NULL) {
        return;
    }
    pthread_mutex_lock(&wd->mu);
    PyObject *old = wd->loop;
    wd->loop = Py_NewRef(run->loop);
    pthread_mutex_unlock(&wd->mu);
    Py_XDECREF(old);   /* not under the mutex: it may run any code */
}

void
aiorun_watchdog_stage(RunObject *run, aiorun_stage stage)
{
    if (run->watchdog != NULL) {
        atomic_store(&run->watchdog->stage, (int)stage);
    }
}

void
aiorun_watchdog_request(RunObject *run, aiorun_request_reason reason)
{
    aiorun_watchdog *wd = run->watchdog;
    if (wd == NULL) {
        return;
    }
    int none = 0;
    if (atomic_compare_exchange_strong(&wd->python_request, &none, (int)reason)) {
        aiorun_sigwake_poke();
    }
}

#else /* MS_WINDOWS */

int
aiorun_register_fork_hook(aiorun_state *st)
{
    (void)st;   /* no fork() */
    return 0;
}

PyObject *
aiorun_after_fork_child(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    Py_RETURN_NONE;
}

int
aiorun_watchdog_start(RunObject *run, double deadline, int exit_on_repeat,
                      int avoid_signum)
{
    (void)avoid_signum;
    (void)run;
    (void)deadline;
    (void)exit_on_repeat;
    PyErr_SetString(PyExc_NotImplementedError,
                    "run(): 'shutdown_deadline' and 'exit_on_repeated_signal' "
                    "are not available on Windows yet");
    return -1;
}

void
aiorun_watchdog_stop(RunObject *run)
{
    (void)run;
}

void
aiorun_watchdog_loop_ready(RunObject *run)
{
    (void)run;
}

void
aiorun_watchdog_hand_over(RunObject *run)
{
    (void)run;
}

void
aiorun_exit_guard_retire(aiorun_state *st)
{
    (void)st;
}

PyObject *
aiorun_exit_began(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    Py_RETURN_NONE;
}

void
aiorun_watchdog_stage(RunObject *run, aiorun_stage stage)
{
    (void)run;
    (void)stage;
}

void
aiorun_watchdog_request(RunObject *run, aiorun_request_reason reason)
{
    (void)run;
    (void)reason;
}

#endif /* MS_WINDOWS */
