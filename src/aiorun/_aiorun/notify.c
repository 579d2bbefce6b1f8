/* systemd's notification protocol (sd_notify(3)), spoken directly: one
 * datagram per message to the AF_UNIX socket named by NOTIFY_SOCKET, no
 * libsystemd.  Nothing happens unless NOTIFY_SOCKET is set.
 *
 * What run() says, in order:
 *   STATUS=starting                        run() has begun setting up
 *   READY=1 + STATUS=running               the main coroutine has started
 *                                          (or notify_ready(), when asked)
 *   STOPPING=1 + STATUS=stopping: <why>    the first signal (or Ctrl-C's
 *                                          KeyboardInterrupt); not when the
 *                                          loop stopped or an error stopped
 *                                          it: another run() may follow
 *   STATUS=shutdown: <phase> + EXTEND_TIMEOUT_USEC=<us>   each phase
 *   STATUS=stopped                         run() is returning
 * Only the run() that owns the process says anything (aiorun.h).
 * and WATCHDOG=1 every WATCHDOG_USEC / 2, sent by a timer on the event loop
 * itself, so a blocked loop stops the pings and systemd acts on it.
 *
 * Sends never block (a full socket drops the message, where sd_notify would
 * block the loop) and never fail run(): a notification is advice to the
 * supervisor, and a receiver that went away ends the sending. */
#include "aiorun.h"

#include <string.h>

#ifndef MS_WINDOWS

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NOTIFY_ENV "NOTIFY_SOCKET"

struct aiorun_notifier {
    int fd;
    struct sockaddr_un addr;
    socklen_t addrlen;
    double ping_interval;      /* seconds; 0 when systemd wants no pings */
    long long extend_usec;     /* EXTEND_TIMEOUT_USEC sent with each phase */
    int stopping_sent;
    int gone;                  /* the receiver went away: nothing more is sent */
};

/* The largest EXTEND_TIMEOUT_USEC we send: about 31 years, far beyond any
 * real bound, and far below what overflows systemd's (or our) arithmetic.
 * A phase with no limit (an infinite timeout) asks for this much. */
#define MAX_EXTEND_USEC 1000000000000000LL

/* seconds (>= 0, possibly infinite) as microseconds, without the undefined
 * float-to-integer cast of a value out of range. */
static long long
usec_from_seconds(double seconds)
{
    double usec = seconds * 1e6;
    if (!(usec < (double)MAX_EXTEND_USEC)) {   /* also NaN */
        return MAX_EXTEND_USEC;
    }
    return usec > 0 ? (long long)usec : 0;
}

static const char *const phase_status[] = {
    [STAGE_STARTING] = NULL,
    [STAGE_RUNNING] = NULL,
    [STAGE_HANDLER] = "calling shutdown_handler",
    [STAGE_SHUTDOWN] = "the loop stopped",
    [STAGE_CALLBACK] = "running shutdown_callback",
    [STAGE_DRAINING] = "letting tasks finish",
    [STAGE_CANCELLING] = "cancelling tasks",
    [STAGE_WAITING_TASKS] = "waiting for tasks",
    [STAGE_EXECUTOR] = "shutting down the executor",
    [STAGE_ASYNCGENS] = "closing async generators",
    [STAGE_CLOSING] = "closing the loop",
    [STAGE_LEAVING] = NULL,
};

/* NOTIFY_SOCKET as a socket address: "/path", or "@name" for the abstract
 * namespace.  0 when it is usable, -1 (with *why set) when not. */
static int
parse_address(const char *value, struct sockaddr_un *addr, socklen_t *len,
              const char **why)
{
    size_t n = strlen(value);
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (value[0] != '/' && value[0] != '@') {
        *why = "is not a path or an abstract socket name (only AF_UNIX is supported)";
        return -1;
    }
    if (n < 2 || n > sizeof addr->sun_path - (value[0] == '/')) {
        *why = "has no room in a socket address";
        return -1;
    }
    memcpy(addr->sun_path, value, n);
    if (value[0] == '@') {
        addr->sun_path[0] = '\0';   /* abstract: no terminating NUL counted */
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    }
    else {
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    }
    return 0;
}

/* 0 if sent, else the errno: EAGAIN when a full socket dropped it. */
static int
send_to(int fd, const struct sockaddr_un *addr, socklen_t len, const char *message)
{
    ssize_t sent = sendto(fd, message, strlen(message), MSG_NOSIGNAL | MSG_DONTWAIT,
                          (const struct sockaddr *)addr, len);
    return sent >= 0 ? 0 : errno == EWOULDBLOCK ? EAGAIN : errno;
}

static int
open_socket(void)
{
    return socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
}

/* The notifier, while there is someone to tell; NULL otherwise. */
static aiorun_notifier *
live_notifier(RunObject *run)
{
    aiorun_notifier *nt = run->notifier;
    return nt != NULL && !nt->gone ? nt : NULL;
}

/* Never frees the notifier: a caller may hold it across a call into
 * Python, where a signal handler can say something too.  Only
 * aiorun_notify_stop() frees it. */
static void
say(RunObject *run, const char *message)
{
    aiorun_notifier *nt = live_notifier(run);
    int error = nt != NULL ? send_to(nt->fd, &nt->addr, nt->addrlen, message) : 0;
    /* A full socket drops the message; any other error means gone. */
    if (error != 0 && error != EAGAIN) {
        /* The receiver went away: systemd will not read more either. */
        close(nt->fd);
        nt->fd = -1;
        nt->gone = 1;
    }
}

/* The NOTIFY_SOCKET value for a message: any bytes, shown with escapes and
 * cut at 60 characters, never half-way through one. */
static PyObject *
shown_value(const char *value)
{
    PyObject *text = PyUnicode_DecodeUTF8(value, (Py_ssize_t)strlen(value),
                                          "backslashreplace");
    if (text == NULL) {
        return NULL;
    }
    /* A substring, not "%.60U": PyPy's PyUnicode_FromFormat ignores the
     * precision. */
    Py_ssize_t len = PyUnicode_GetLength(text);
    if (len < 0) {
        Py_CLEAR(text);
    }
    else if (len > 60) {
        Py_SETREF(text, PyUnicode_Substring(text, 0, 60));
    }
    return text;
}

/* WATCHDOG_USEC, when systemd asks this process (WATCHDOG_PID, if set, is
 * ours) for pings: half of it, in seconds; 0 for none, -1 if malformed. */
static double
parse_ping_interval(const char *usec, const char *pid)
{
    char *end;
    if (usec == NULL || *usec == '\0') {
        return 0;
    }
    if (pid != NULL && *pid != '\0') {
        long long who = strtoll(pid, &end, 10);
        if (*end != '\0' || who <= 0) {
            return -1;
        }
        if (who != (long long)getpid()) {
            return 0;
        }
    }
    errno = 0;
    long long us = strtoll(usec, &end, 10);
    if (*end != '\0' || errno != 0 || us <= 0) {
        return -1;
    }
    return (double)us / 2e6;
}

/* The same from the environment: 0, or -1 with an exception. */
static int
ping_interval(aiorun_state *st, double *interval)
{
    PyObject *usec = NULL, *pid = NULL;
    if (aiorun_getenv(st, "WATCHDOG_USEC", &usec) < 0
        || aiorun_getenv(st, "WATCHDOG_PID", &pid) < 0) {
        Py_XDECREF(usec);
        return -1;
    }
    *interval = parse_ping_interval(usec ? PyBytes_AS_STRING(usec) : NULL,
                                    pid ? PyBytes_AS_STRING(pid) : NULL);
    Py_XDECREF(usec);
    Py_XDECREF(pid);
    return 0;
}

int
aiorun_notify_start(RunObject *run, double task_timeout)
{
    PyObject *env;
    const char *why = NULL;
    struct sockaddr_un addr;
    socklen_t len;
    if (aiorun_getenv(run->state, NOTIFY_ENV, &env) < 0) {
        return -1;
    }
    const char *value = env ? PyBytes_AS_STRING(env) : NULL;
    if (value == NULL || *value == '\0') {
        Py_XDECREF(env);
        return 0;
    }
    int usable = parse_address(value, &addr, &len, &why);
    PyObject *shown = usable < 0 ? shown_value(value) : NULL;
    Py_DECREF(env);
    if (usable < 0) {
        PyObject *message = shown ? PyUnicode_FromFormat(
            "environment variable " NOTIFY_ENV "='%U' %s: no notifications are sent",
            shown, why) : NULL;
        int rc = message ? aiorun_log_exc(run->state, LOG_WARNING, "%s", message, NULL)
                         : -1;
        Py_XDECREF(shown);
        Py_XDECREF(message);
        return rc;
    }
    double interval;
    if (ping_interval(run->state, &interval) < 0) {
        return -1;
    }
    if (interval < 0) {
        interval = 0;
        if (aiorun_log(run->state, LOG_WARNING,
                       "environment variables WATCHDOG_USEC/WATCHDOG_PID are not "
                       "positive integers: no watchdog pings are sent") < 0) {
            return -1;
        }
    }
    aiorun_notifier *nt = PyMem_RawMalloc(sizeof *nt);
    if (nt == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    nt->fd = open_socket();
    if (nt->fd < 0) {
        PyMem_RawFree(nt);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    nt->addr = addr;
    nt->addrlen = len;
    nt->ping_interval = interval;
    /* A phase may wait for tasks up to the task timeout; give it that
     * much and 5 s more (60 s when the timeout is None). */
    nt->extend_usec = usec_from_seconds((task_timeout >= 0 ? task_timeout : 60) + 5);
    nt->stopping_sent = 0;
    nt->gone = 0;
    run->notifier = nt;
    say(run, "STATUS=starting");
    return 0;
}

/* Schedules `method` of run on its loop after `delay` seconds (call_soon
 * when delay is 0); returns the handle. */
static PyObject *
schedule(RunObject *run, const char *method, double delay)
{
    PyObject *callback = aiorun_run_method(run, method);
    if (callback == NULL) {
        return NULL;
    }
    PyObject *handle = delay > 0
        ? PyObject_CallMethod(run->loop, "call_later", "dO", delay, callback)
        : PyObject_CallMethod(run->loop, "call_soon", "O", callback);
    Py_DECREF(callback);
    return handle;
}

int
aiorun_notify_loop_ready(RunObject *run, int ready_on_start)
{
    if (live_notifier(run) == NULL && run->health == NULL) {
        return 0;
    }
    if (ready_on_start) {
        /* Queued behind the main task's first step: READY=1 goes out once
         * the main coroutine has started. */
        PyObject *handle = schedule(run, "_notify_ready", 0);
        if (handle == NULL) {
            return -1;
        }
        Py_DECREF(handle);
    }
    /* Looked up again: call_soon() may have run a signal handler whose
     * STOPPING=1 found the receiver gone. */
    aiorun_notifier *nt = live_notifier(run);
    if (nt != NULL && nt->ping_interval > 0) {
        /* Made first, then swapped in: schedule() runs Python code (a loop
         * may even call the callback at once) that may swap it too. */
        PyObject *timer = schedule(run, "_notify_watchdog", 0);
        if (timer == NULL) {
            return -1;
        }
        Py_XSETREF(run->ping_timer, timer);
    }
    return 0;
}

PyObject *
aiorun_run_notify_ready(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    aiorun_health_ready(run);
    aiorun_notifier *nt = live_notifier(run);
    if (nt != NULL && !nt->stopping_sent
        && !aiorun_flag_get(&run->state->service_stopping)) {
        say(run, "READY=1\nSTATUS=running");
        aiorun_flag_set(&run->state->service_ready);
    }
    Py_RETURN_NONE;
}

PyObject *
aiorun_run_notify_watchdog(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    if (live_notifier(run) == NULL || run->phase == PHASE_DONE) {
        Py_CLEAR(run->ping_timer);
        Py_RETURN_NONE;
    }
    say(run, "WATCHDOG=1");
    aiorun_notifier *nt = live_notifier(run);
    double interval = nt ? nt->ping_interval : 0;
    PyObject *next = interval > 0 ? schedule(run, "_notify_watchdog", interval) : NULL;
    Py_XSETREF(run->ping_timer, next);
    if (next == NULL && PyErr_Occurred()) {
        return NULL;   /* the loop logs it; the pings stop, so systemd acts */
    }
    Py_RETURN_NONE;
}

void
aiorun_notify_stopping(RunObject *run, int signum)
{
    aiorun_notifier *nt = live_notifier(run);
    if (nt == NULL || nt->stopping_sent) {
        return;
    }
    nt->stopping_sent = 1;
    aiorun_flag_set(&run->state->service_stopping);
    const char *name = signum == SIGINT ? "SIGINT received"
                     : signum == SIGTERM ? "SIGTERM received"
                     : signum > 0 ? "a signal received" : "KeyboardInterrupt";
    char message[120];
    snprintf(message, sizeof message, "STOPPING=1\nSTATUS=stopping: %s", name);
    say(run, message);
}

void
aiorun_notify_stage(RunObject *run, aiorun_stage stage)
{
    if (live_notifier(run) == NULL || stage < 0 || stage > STAGE_LEAVING) {
        return;
    }
    if (stage == STAGE_LEAVING) {
        say(run, "STATUS=stopped");
        return;
    }
    const char *status = phase_status[stage];
    if (status == NULL) {
        return;
    }
    /* Only a stop request stops the service (aiorun.h): after loop.stop()
     * or an error another run() may follow. */
    if (run->cause == CAUSE_SIGNAL || run->cause == CAUSE_KEYBOARD_INTERRUPT) {
        aiorun_notify_stopping(run, run->cause == CAUSE_SIGNAL ? run->cause_signum : 0);
    }
    aiorun_notifier *nt = live_notifier(run);
    if (nt == NULL) {
        return;
    }
    /* The drain lasts drain_delay, not timeout_task_shutdown. */
    long long extend = stage == STAGE_DRAINING ? usec_from_seconds(run->drain_delay + 5)
                                               : nt->extend_usec;
    char message[160];
    snprintf(message, sizeof message, "STATUS=shutdown: %s\nEXTEND_TIMEOUT_USEC=%lld",
             status, extend);
    say(run, message);
}

/* CLOCK_MONOTONIC in microseconds, as systemd reads it. */
static unsigned long long
monotonic_usec(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (unsigned long long)now.tv_sec * 1000000ULL
        + (unsigned long long)now.tv_nsec / 1000ULL;
}

void
aiorun_notify_reloading(RunObject *run)
{
    /* Stamped now, after the SIGHUP: systemd takes only a reload stamped
     * after its signal as the answer to it. */
    run->reload_usec = monotonic_usec();
    if (live_notifier(run) != NULL) {
        say(run, "STATUS=reloading");
    }
}

void
aiorun_notify_reloaded(RunObject *run, PyObject *exc)
{
    aiorun_notifier *nt = live_notifier(run);
    if (nt == NULL || nt->stopping_sent || aiorun_flag_get(&run->state->service_stopping)) {
        return;
    }
    if (!aiorun_flag_get(&run->state->service_ready)) {
        return;   /* still starting (a SIGHUP of someone's): READY=1 is the app's */
    }
    if (exc == NULL) {
        /* RELOADING=1 only now, with READY=1: the reload is over and went
         * well.  Said at its start, it could not be taken back when the
         * callback fails (reload.c). */
        char message[128];
        snprintf(message, sizeof message,
                 "RELOADING=1\nMONOTONIC_USEC=%llu\nREADY=1\nSTATUS=running",
                 run->reload_usec);
        say(run, message);
        return;
    }
    /* Nothing systemd would take as the end of the reload: it fails it at
     * its timeout (reload.c). */
    PyObject *text = PyUnicode_FromFormat(
        "STATUS=reload failed (%.100s), serving on with the old state",
        Py_TYPE(exc)->tp_name);
    const char *bytes = text ? PyUnicode_AsUTF8(text) : NULL;
    if (bytes != NULL && strchr(bytes, '\n') == NULL) {
        say(run, bytes);
    }
    else {
        PyErr_Clear();
        say(run, "STATUS=reload failed, serving on with the old state");
    }
    Py_XDECREF(text);
}

void
aiorun_notify_stop(RunObject *run)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (run->ping_timer != NULL) {
        /* A loop that outlives run() (the caller's own) pings no more. */
        PyObject *res = PyObject_CallMethod(run->ping_timer, "cancel", NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(run->ping_timer);
        }
        Py_XDECREF(res);
        Py_CLEAR(run->ping_timer);
    }
    if (run->notifier != NULL) {
        if (run->notifier->fd >= 0) {
            close(run->notifier->fd);
        }
        PyMem_RawFree(run->notifier);
        run->notifier = NULL;
    }
    PyErr_Restore(type, value, tb);
}

/* "the socket <shown>: <strerror>", the system's text decoded as the
 * locale says (it may not be UTF-8). */
static PyObject *
socket_error(PyObject *shown, int error)
{
    PyObject *why = PyUnicode_DecodeLocale(strerror(error), "surrogateescape");
    PyObject *text = why ? PyUnicode_FromFormat("the socket %U: %U", shown, why) : NULL;
    Py_XDECREF(why);
    return text;
}

/* message, with fd (when >= 0) passed along as SCM_RIGHTS: 0 if sent,
 * else the errno, EAGAIN when a full socket dropped it. */
static int
send_with_fd(int sock, const struct sockaddr_un *addr, socklen_t len,
             const char *message, int fd)
{
    if (fd < 0) {
        return send_to(sock, addr, len, message);
    }
    struct iovec iov = {(void *)message, strlen(message)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_name = (void *)addr;
    msg.msg_namelen = len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    return sent >= 0 ? 0 : errno == EWOULDBLOCK ? EAGAIN : errno;
}

int
aiorun_notify_oneshot(aiorun_state *st, const char *message, int fd,
                      const char *refusal, PyObject **problem)
{
    PyObject *env;
    const char *why;
    struct sockaddr_un addr;
    socklen_t len;
    *problem = NULL;
    if (aiorun_getenv(st, NOTIFY_ENV, &env) < 0) {
        return -1;
    }
    const char *value = env ? PyBytes_AS_STRING(env) : NULL;
    if (value == NULL || *value == '\0') {
        Py_XDECREF(env);
        return 0;
    }
    PyObject *shown = shown_value(value);
    int usable = shown ? parse_address(value, &addr, &len, &why) : -1;
    Py_DECREF(env);
    if (shown == NULL) {
        return -1;
    }
    if (refusal != NULL) {
        *problem = PyUnicode_FromString(refusal);
    }
    else if (usable < 0) {
        *problem = PyUnicode_FromFormat("environment variable " NOTIFY_ENV "='%U' %s",
                                        shown, why);
    }
    else {
        int sock = open_socket();
        int error = sock < 0 ? errno : send_with_fd(sock, &addr, len, message, fd);
        if (sock >= 0) {
            close(sock);
        }
        if (error == 0) {
            Py_DECREF(shown);
            return 1;
        }
        *problem = error == EAGAIN
            ? PyUnicode_FromFormat("the socket %U is full (nobody reads it): "
                                   "the message was dropped", shown)
            : socket_error(shown, error);
    }
    Py_DECREF(shown);
    return *problem == NULL ? -1 : 0;
}

/* READY=1 and STATUS=text on a socket of its own (so it works from any
 * thread and outside run()): 1 if delivered, 0 if not (without
 * NOTIFY_SOCKET quietly; for a delivery problem, with a WARNING that says
 * what happened), -1 with an exception (only MemoryError and the like: a
 * delivery problem never raises, so the app that asked goes on). */
static int
send_ready(aiorun_state *st, const char *text)
{
    PyObject *message = PyUnicode_FromFormat("READY=1\nSTATUS=%s", text);
    const char *bytes = message ? PyUnicode_AsUTF8(message) : NULL;
    if (bytes == NULL) {
        Py_XDECREF(message);
        return -1;
    }
    PyObject *problem;
    /* systemd has been told the service is stopping: READY=1 now would take
     * that back (the ownership rule in aiorun.h). */
    int rc = aiorun_notify_oneshot(
        st, bytes, -1,
        aiorun_flag_get(&st->service_stopping)
            ? "STOPPING=1 was sent already, and READY=1 never follows it" : NULL,
        &problem);
    Py_DECREF(message);
    if (rc == 1) {
        aiorun_flag_set(&st->service_ready);
    }
    if (rc != 0 || problem == NULL) {
        return rc;
    }
    rc = aiorun_log_exc(st, LOG_WARNING, "notify_ready(): READY=1 not delivered: %s",
                        problem, NULL);
    Py_DECREF(problem);
    return rc < 0 ? -1 : 0;
}

#else /* MS_WINDOWS: systemd does not exist there */

int
aiorun_notify_start(RunObject *run, double task_timeout)
{
    (void)run;
    (void)task_timeout;
    return 0;
}

int
aiorun_notify_loop_ready(RunObject *run, int ready_on_start)
{
    (void)run;
    (void)ready_on_start;
    return 0;
}

PyObject *
aiorun_run_notify_ready(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

PyObject *
aiorun_run_notify_watchdog(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

void
aiorun_notify_stopping(RunObject *run, int signum)
{
    (void)run;
    (void)signum;
}

void
aiorun_notify_stage(RunObject *run, aiorun_stage stage)
{
    (void)run;
    (void)stage;
}

void
aiorun_notify_stop(RunObject *run)
{
    (void)run;
}

void
aiorun_notify_reloading(RunObject *run)
{
    (void)run;
}

void
aiorun_notify_reloaded(RunObject *run, PyObject *exc)
{
    (void)run;
    (void)exc;
}

int
aiorun_notify_oneshot(aiorun_state *st, const char *message, int fd,
                      const char *refusal, PyObject **problem)
{
    (void)st;
    (void)message;
    (void)fd;
    (void)refusal;
    *problem = NULL;
    return 0;
}

static int
send_ready(aiorun_state *st, const char *text)
{
    (void)st;
    (void)text;
    return 0;
}

#endif /* MS_WINDOWS */

/* aiorun.notify_ready(status=None): READY=1 (and STATUS=status) for apps
 * that are ready later than their start; True if delivered, False if not
 * (a delivery problem is a WARNING, never an exception). */
PyObject *
aiorun_notify_ready(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"status", NULL};
    PyObject *status = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:notify_ready", kwlist, &status)) {
        return NULL;
    }
    const char *text = "running";
    if (status != Py_None) {
        if (!PyUnicode_Check(status)) {
            PyErr_Format(PyExc_TypeError,
                         "notify_ready() argument 'status' must be str or None, not %.200s",
                         Py_TYPE(status)->tp_name);
            return NULL;
        }
        Py_ssize_t size;
        text = PyUnicode_AsUTF8AndSize(status, &size);
        if (text == NULL) {
            return NULL;
        }
        if (strlen(text) != (size_t)size || strchr(text, '\n') != NULL) {
            PyErr_SetString(PyExc_ValueError,
                            "notify_ready() argument 'status' must be one line");
            return NULL;
        }
    }
    aiorun_state *st = aiorun_get_state(module);
#ifndef MS_WINDOWS
    atomic_fetch_add(&st->ready_calls, 1);   /* the health endpoint's /readyz */
#endif
    int sent = send_ready(st, text);
    if (sent < 0) {
        return NULL;
    }
    return PyBool_FromLong(sent);
}
