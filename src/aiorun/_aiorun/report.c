/* The shutdown report: what the shutdown did, gathered as it goes, told in
 * one INFO line at the end of every shutdown and, when asked
 * (shutdown_report=PATH), written as JSON (shutdown_report.schema.json).
 *
 * The figures are kept in C, in the Run's report, with no Python object:
 * the watchdog's thread writes the same JSON on a forced exit, without the
 * GIL, while the loop's thread may be anywhere.  Counters are atomics, the
 * phase list and the refused tasks' text are append-only and published by
 * their length, so that thread reads only what is complete. */
#include "aiorun.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef MS_WINDOWS
#include <dirent.h>
#include <unistd.h>
#else
#include <io.h>
#include <process.h>
#define getpid _getpid
#define write _write
#define close _close
#define unlink _unlink
#endif

#define REPORT_PATH_ENV "AIORUN_SHUTDOWN_REPORT"
#define JSON_MAX (1 << 20)

static const char *const phase_names[] = {
    [STAGE_STARTING] = "starting",
    [STAGE_RUNNING] = "running",
    [STAGE_HANDLER] = "shutdown_handler",
    [STAGE_SHUTDOWN] = "shutdown",
    [STAGE_CALLBACK] = "shutdown_callback",
    [STAGE_DRAINING] = "drain",
    [STAGE_CANCELLING] = "cancelling",
    [STAGE_WAITING_TASKS] = "waiting_for_tasks",
    [STAGE_EXECUTOR] = "executor",
    [STAGE_ASYNCGENS] = "async_generators",
    [STAGE_CLOSING] = "closing_the_loop",
    [STAGE_LEAVING] = "leaving",
};

const char *
aiorun_phase_name(int stage)
{
    return stage >= 0 && stage <= STAGE_LEAVING ? phase_names[stage] : "unknown";
}

static double
clock_seconds(int realtime)
{
#ifndef MS_WINDOWS
    struct timespec ts;
    clock_gettime(realtime ? CLOCK_REALTIME : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
#else
    return realtime ? (double)time(NULL) : (double)GetTickCount64() / 1000;
#endif
}

/* ---- gathering, on the loop's thread ---- */

void
aiorun_report_requested(RunObject *run)
{
    aiorun_report *rep = &run->report;
    if (rep->requested_at == 0) {
        rep->requested_wall = clock_seconds(1);
        rep->requested_at = clock_seconds(0);
    }
}

void
aiorun_report_stage(RunObject *run, int stage)
{
    aiorun_report *rep = &run->report;
    if (stage < STAGE_HANDLER) {
        return;
    }
    aiorun_report_requested(run);   /* a shutdown that began without a request */
    int n = (int)aiorun_counter_get(&rep->n_phases);
    if ((n > 0 && rep->phases[n - 1].stage == stage) || n >= AIORUN_REPORT_PHASES) {
        return;
    }
    rep->phases[n].stage = stage;
    rep->phases[n].at = clock_seconds(0);
    aiorun_counter_set(&rep->n_phases, n + 1);   /* published once complete */
}

/* Appends to the refused tasks' JSON (`,` between entries), or marks it
 * cut short when full. */
static void
refused_append(aiorun_report *rep, const char *text, size_t len)
{
    if (rep->refused_json == NULL) {
        rep->refused_json = PyMem_RawMalloc(AIORUN_REPORT_REFUSED_MAX);
        if (rep->refused_json == NULL) {
            rep->refused_cut = 1;
            return;
        }
    }
    size_t used = (size_t)aiorun_counter_get(&rep->refused_len);
    size_t sep = used > 0;
    if (used + sep + len > AIORUN_REPORT_REFUSED_MAX) {
        rep->refused_cut = 1;
        return;
    }
    if (sep) {
        rep->refused_json[used] = ',';
    }
    memcpy(rep->refused_json + used + sep, text, len);
    aiorun_counter_set(&rep->refused_len, (long)(used + sep + len));
}

/* ---- JSON text ---- */

typedef struct {
    char *buf;
    size_t len;
    size_t cap;
    int full;
} json_buf;

static void
put(json_buf *b, const char *s, size_t n)
{
    if (b->full || b->len + n >= b->cap) {
        b->full = 1;
        return;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

static void
puts_(json_buf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void
putf(json_buf *b, const char *format, ...)
{
    char tmp[256];
    va_list va;
    va_start(va, format);
    int n = vsnprintf(tmp, sizeof tmp, format, va);
    va_end(va);
    if (n > 0) {
        put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
    }
}

/* A JSON string of UTF-8 text (n bytes). */
static void
put_string(json_buf *b, const char *s, size_t n)
{
    puts_(b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put(b, esc, 2);
        }
        else if (c == '\n') {
            puts_(b, "\\n");
        }
        else if (c < 0x20 || c == 0x7f) {
            putf(b, "\\u%04x", c);
        }
        else {
            put(b, (const char *)&c, 1);
        }
    }
    puts_(b, "\"");
}

/* A number that JSON can carry (no NaN, no infinity). */
static void
put_seconds(json_buf *b, double s)
{
    if (!isfinite(s)) {
        puts_(b, "null");
    }
    else {
        putf(b, "%.6f", s);
    }
}

static const char *
cause_kind(RunObject *run)
{
    switch (run->cause) {
    case CAUSE_SIGNAL: return "signal";
    case CAUSE_UNHANDLED_ERROR: return "unhandled error";
    case CAUSE_KEYBOARD_INTERRUPT: return "KeyboardInterrupt";
    case CAUSE_LOOP_STOPPED: return "loop.stop()";
    default: return "none";
    }
}

static const char *
signal_text(int signum)
{
    return signum == SIGINT ? "SIGINT" : signum == SIGTERM ? "SIGTERM"
#ifdef SIGBREAK
        : signum == SIGBREAK ? "SIGBREAK"
#endif
        : NULL;
}

/* The threads still there, from the OS (the forced exit: no Python). */
static void
put_os_threads(json_buf *b)
{
    puts_(b, "[");
#ifdef __linux__
    DIR *dir = opendir("/proc/self/task");
    int first = 1;
    struct dirent *e;
    while (dir != NULL && (e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char path[64], name[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%.20s/comm", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = read(fd, name, sizeof name - 1);
            close(fd);
            name[n > 0 ? n : 0] = '\0';
            name[strcspn(name, "\n")] = '\0';
        }
        puts_(b, first ? "{\"name\": " : ", {\"name\": ");
        put_string(b, name, strlen(name));
        putf(b, ", \"tid\": %ld}", atol(e->d_name));
        first = 0;
    }
    if (dir != NULL) {
        closedir(dir);
    }
#endif
    puts_(b, "]");
}

/* The whole report.  outcome_kind: "returned", "raised" or "forced_exit";
 * exception: its text or NULL; threads_json: a JSON array or NULL (then
 * the OS's list); phase: the stage the forced exit found, or -1. */
static int
render(RunObject *run, json_buf *b, const char *outcome_kind, const char *exception,
       size_t exception_len, const char *threads_json, int forced_stage, double now)
{
    aiorun_report *rep = &run->report;
    double t0 = rep->requested_at;
    puts_(b, "{\n  \"version\": 1,\n");
    putf(b, "  \"pid\": %ld,\n", (long)getpid());
    putf(b, "  \"cause\": {\"kind\": \"%s\"", cause_kind(run));
    if (run->cause == CAUSE_SIGNAL) {
        const char *name = signal_text(run->cause_signum);
        if (name != NULL) {
            putf(b, ", \"signal\": \"%s\"", name);
        }
        else {
            putf(b, ", \"signal\": \"signal %d\"", run->cause_signum);
        }
    }
    puts_(b, "},\n  \"requested_at\": ");
    put_seconds(b, rep->requested_wall);
    puts_(b, ",\n  \"duration_s\": ");
    put_seconds(b, now - t0);
    puts_(b, ",\n  \"phases\": [");
    int n = (int)aiorun_counter_get(&rep->n_phases);
    for (int i = 0; i < n; i++) {
        double start = rep->phases[i].at;
        double end = i + 1 < n ? rep->phases[i + 1].at : now;
        putf(b, "%s\n    {\"name\": \"%s\", \"start_s\": ", i ? "," : "",
             phase_names[rep->phases[i].stage]);
        put_seconds(b, start - t0);
        puts_(b, ", \"duration_s\": ");
        put_seconds(b, end - start);
        puts_(b, "}");
    }
    puts_(b, n ? "\n  ],\n" : "],\n");
    putf(b, "  \"tasks\": {\"finished_in_drain\": %ld, \"cancelled\": %ld, "
         "\"refused_to_exit\": %ld, \"refused\": [",
         (long)aiorun_counter_get(&rep->drained),
         (long)aiorun_counter_get(&rep->cancelled),
         (long)aiorun_counter_get(&rep->refused));
    long rlen = aiorun_counter_get(&rep->refused_len);
    if (rlen > 0) {
        put(b, rep->refused_json, (size_t)rlen);
    }
    putf(b, "], \"refused_list_complete\": %s},\n", rep->refused_cut ? "false" : "true");
    long prot = aiorun_counter_get(&rep->protected_seen);
    long aband = aiorun_counter_get(&rep->protected_abandoned);
    putf(b, "  \"protected\": {\"finished\": %ld, \"abandoned\": %ld},\n",
         prot - aband, aband);
    puts_(b, "  \"threads\": ");
    if (threads_json != NULL) {
        puts_(b, threads_json);
    }
    else {
        put_os_threads(b);
    }
    putf(b, ",\n  \"outcome\": {\"kind\": \"%s\", \"exception\": ", outcome_kind);
    if (exception != NULL) {
        put_string(b, exception, exception_len);
    }
    else {
        puts_(b, "null");
    }
    if (forced_stage >= 0) {
        putf(b, ", \"exit_code\": %d, \"phase\": \"%s\"", AIORUN_FORCED_EXIT_CODE,
             phase_names[forced_stage]);
    }
    else {
        puts_(b, ", \"exit_code\": null, \"phase\": null");
    }
    puts_(b, "}\n}\n");
    return b->full ? -1 : 0;
}

/* Writes the text to path through a temporary file and a rename, so a
 * reader never sees half a report.  0, or an errno. */
static int
write_file(const char *path, const char *text, size_t len)
{
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    if (tmp == NULL) {
        return ENOMEM;
    }
    snprintf(tmp, plen + 16, "%s.tmp%ld", path, (long)getpid() % 100000);
#ifndef MS_WINDOWS
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
#else
    int fd = _open(tmp, _O_WRONLY | _O_CREAT | _O_TRUNC | _O_BINARY, 0644);
#endif
    int err = 0;
    if (fd < 0) {
        err = errno;
    }
    else {
        while (len > 0) {
            Py_ssize_t n = write(fd, text, (unsigned int)(len < (1u << 30) ? len : (1u << 30)));
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                err = n < 0 ? errno : EIO;
                break;
            }
            text += n;
            len -= (size_t)n;
        }
        if (close(fd) < 0 && err == 0) {
            err = errno;
        }
        if (err == 0 && rename(tmp, path) < 0) {
            err = errno;
        }
        if (err != 0) {
            unlink(tmp);
        }
    }
    free(tmp);
    return err;
}

/* ---- from the watchdog's thread, on a forced exit (no GIL) ---- */

void
aiorun_report_forced_exit(RunObject *run, int stage)
{
    const char *path = run->report.path;
    if (path == NULL) {
        return;
    }
    json_buf b = {malloc(JSON_MAX), 0, JSON_MAX, 0};
    if (b.buf == NULL) {
        return;
    }
    b.buf[0] = '\0';
    if (stage < STAGE_HANDLER || stage > STAGE_LEAVING) {
        stage = STAGE_RUNNING;
    }
    render(run, &b, "forced_exit", NULL, 0, NULL, stage, clock_seconds(0));
    (void)write_file(path, b.buf, b.len);
    free(b.buf);
}

/* ---- at the end of the shutdown, on the loop's thread ---- */

/* threading.enumerate() as a JSON array (a new bytes object), and the
 * number of threads other than this one that are not daemons; NULL with
 * an exception set. */
static PyObject *
python_threads(long *non_daemon)
{
    *non_daemon = 0;
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *threads = threading ? PyObject_CallMethod(threading, "enumerate", NULL) : NULL;
    PyObject *current = threads ? PyObject_CallMethod(threading, "current_thread", NULL)
                                : NULL;
    Py_XDECREF(threading);
    PyObject *seq = current ? PySequence_Fast(threads, "threading.enumerate()") : NULL;
    Py_XDECREF(threads);
    if (seq == NULL) {
        Py_XDECREF(current);
        return NULL;
    }
    json_buf b = {PyMem_Malloc(65536), 0, 65536, 0};
    if (b.buf == NULL) {
        Py_DECREF(seq);
        Py_DECREF(current);
        return PyErr_NoMemory();
    }
    b.buf[0] = '\0';
    puts_(&b, "[");
    int first = 1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (t == current) {
            continue;
        }
        PyObject *name = PyObject_GetAttrString(t, "name");
        PyObject *daemon = name ? PyObject_GetAttrString(t, "daemon") : NULL;
        int is_daemon = daemon ? PyObject_IsTrue(daemon) : -1;
        Py_XDECREF(daemon);
        if (name != NULL && is_daemon >= 0 && !PyUnicode_Check(name)) {
            Py_SETREF(name, PyObject_Str(name));   /* a thread object of someone's */
        }
        PyObject *utf8 = name && is_daemon >= 0
            ? PyUnicode_AsEncodedString(name, "utf-8", "backslashreplace") : NULL;
        Py_XDECREF(name);
        if (utf8 == NULL) {
            Py_DECREF(seq);
            Py_DECREF(current);
            PyMem_Free(b.buf);
            return NULL;
        }
        puts_(&b, first ? "{\"name\": " : ", {\"name\": ");
        put_string(&b, PyBytes_AS_STRING(utf8), (size_t)PyBytes_GET_SIZE(utf8));
        putf(&b, ", \"daemon\": %s}", is_daemon ? "true" : "false");
        Py_DECREF(utf8);
        first = 0;
        *non_daemon += !is_daemon;
    }
    puts_(&b, "]");
    Py_DECREF(seq);
    Py_DECREF(current);
    /* Too many to list in 64 KiB: none listed, rather than a cut array. */
    PyObject *res = b.full ? PyBytes_FromString("[]")
                           : PyBytes_FromStringAndSize(b.buf, (Py_ssize_t)b.len);
    PyMem_Free(b.buf);
    return res;
}

/* "ValueError: boom" for the exception run() is about to raise (its type
 * alone when str() of it fails: that error is kept). */
static PyObject *
exception_text(RunObject *run, PyObject *exc)
{
    PyObject *text = PyUnicode_FromFormat("%s: %S", Py_TYPE(exc)->tp_name, exc);
    if (text == NULL) {
        aiorun_keep_error(run, "str() of the exception");
        text = PyUnicode_FromString(Py_TYPE(exc)->tp_name);
    }
    PyObject *utf8 = text ? PyUnicode_AsEncodedString(text, "utf-8", "backslashreplace")
                          : NULL;
    Py_XDECREF(text);
    return utf8;
}

static const char *
summary_cause(RunObject *run, char *buf, size_t size)
{
    if (run->cause == CAUSE_SIGNAL) {
        const char *name = signal_text(run->cause_signum);
        if (name == NULL) {
            snprintf(buf, size, "signal %d", run->cause_signum);
            return buf;
        }
        return name;
    }
    return cause_kind(run);
}

void
aiorun_report_end(RunObject *run, PyObject *exc)
{
    aiorun_report *rep = &run->report;
    aiorun_state *st = run->state;
    double now = clock_seconds(0);
    long non_daemon = 0;
    PyObject *threads = python_threads(&non_daemon);
    if (threads == NULL) {
        aiorun_keep_error(run, "Listing the threads for the shutdown summary");
    }
    char cause_buf[32], seconds[32];
    snprintf(seconds, sizeof seconds, "%.3f", now - rep->requested_at);
    long prot = aiorun_counter_get(&rep->protected_seen);
    long aband = aiorun_counter_get(&rep->protected_abandoned);
    long cancelled = aiorun_counter_get(&rep->cancelled);
    PyObject *line = PyUnicode_FromFormat(
        "Shutdown summary (%s, %s s): %ld task%s cancelled, %ld still running at "
        "the timeout, %ld finished during the drain; protected work: %ld finished, "
        "%ld abandoned; non-daemon threads left: %ld.",
        summary_cause(run, cause_buf, sizeof cause_buf), seconds, cancelled,
        cancelled == 1 ? "" : "s", (long)aiorun_counter_get(&rep->refused),
        (long)aiorun_counter_get(&rep->drained), prot - aband, aband, non_daemon);
    if (line == NULL || aiorun_log_exc(st, LOG_INFO, "%s", line, NULL) < 0) {
        aiorun_keep_error(run, "The \"aiorun\" logger");
    }
    Py_XDECREF(line);
    if (rep->path != NULL) {
        PyObject *etext = exc ? exception_text(run, exc) : NULL;
        if (exc != NULL && etext == NULL) {
            aiorun_keep_error(run, "The shutdown report");
        }
        json_buf b = {PyMem_RawMalloc(JSON_MAX), 0, JSON_MAX, 0};
        int err = ENOMEM;
        if (b.buf != NULL) {
            b.buf[0] = '\0';
            int ok = render(run, &b, exc ? "raised" : "returned",
                            etext ? PyBytes_AS_STRING(etext) : NULL,
                            etext ? (size_t)PyBytes_GET_SIZE(etext) : 0,
                            threads ? PyBytes_AS_STRING(threads) : "[]", -1, now) == 0;
            err = ok ? 0 : EFBIG;
            if (ok) {
                Py_BEGIN_ALLOW_THREADS
                err = write_file(rep->path, b.buf, b.len);
                Py_END_ALLOW_THREADS
            }
            PyMem_RawFree(b.buf);
        }
        Py_XDECREF(etext);
        if (err != 0) {
            PyObject *where = PyUnicode_DecodeFSDefault(rep->path);
            PyObject *why = where ? PyUnicode_FromFormat("%U: %s", where, strerror(err))
                                  : NULL;
            if (why == NULL
                || aiorun_log_exc(st, LOG_WARNING, "The shutdown report could not be "
                                  "written: %s", why, NULL) < 0) {
                aiorun_keep_error(run, "The \"aiorun\" logger");
            }
            Py_XDECREF(where);
            Py_XDECREF(why);
        }
    }
    Py_XDECREF(threads);
}

/* ---- the argument ---- */

int
aiorun_report_configure(RunObject *run, PyObject *arg, int use_env)
{
    aiorun_state *st = run->state;
    PyObject *bytes = NULL;
    if (arg == Py_None) {
        if (!use_env) {
            return 0;
        }
        int rc = aiorun_getenv(st, REPORT_PATH_ENV, &bytes);
        if (rc <= 0) {
            return rc;
        }
        if (PyBytes_GET_SIZE(bytes) == 0) {
            Py_DECREF(bytes);
            return 0;
        }
    }
    else {
        PyObject *path = PyOS_FSPath(arg);
        if (path == NULL || !PyUnicode_Check(path)) {
            Py_XDECREF(path);
            PyErr_Format(PyExc_TypeError, "run() argument 'shutdown_report' must be a "
                         "str or os.PathLike path, or None, not %.200s",
                         Py_TYPE(arg)->tp_name);
            return -1;
        }
        bytes = PyUnicode_EncodeFSDefault(path);
        Py_DECREF(path);
        if (bytes == NULL) {
            return -1;
        }
    }
    const char *text = PyBytes_AS_STRING(bytes);
    if (strlen(text) != (size_t)PyBytes_GET_SIZE(bytes) || text[0] == '\0') {
        Py_DECREF(bytes);
        PyErr_SetString(PyExc_ValueError, arg == Py_None
                        ? "environment variable " REPORT_PATH_ENV " must be a path"
                        : "run() argument 'shutdown_report' must be a non-empty path "
                          "without NUL");
        return -1;
    }
    char *copy = PyMem_RawMalloc(strlen(text) + 1);
    if (copy == NULL) {
        Py_DECREF(bytes);
        PyErr_NoMemory();
        return -1;
    }
    strcpy(copy, text);
    Py_DECREF(bytes);
    run->report.path = copy;
    return 0;
}

void
aiorun_report_free(RunObject *run)
{
    aiorun_report *rep = &run->report;
    PyMem_RawFree(rep->path);
    rep->path = NULL;
    PyMem_RawFree(rep->refused_json);
    rep->refused_json = NULL;
    aiorun_counter_set(&rep->refused_len, 0);
}

/* ---- what the shutdown calls as it goes ---- */

void
aiorun_report_cancelled(RunObject *run)
{
    aiorun_counter_add(&run->report.cancelled, 1);
}

void
aiorun_report_protected(RunObject *run)
{
    aiorun_counter_add(&run->report.protected_seen, 1);
}

void
aiorun_report_drained(RunObject *run, long n)
{
    aiorun_counter_add(&run->report.drained, n);
}

/* A task that refused to exit. */
void
aiorun_report_refused(RunObject *run, PyObject *task)
{
    aiorun_report *rep = &run->report;
    aiorun_counter_add(&rep->refused, 1);
    int protected_ = aiorun_is_protected(run->state, task);
    if (protected_ < 0) {
        aiorun_keep_error(run, "A task");
    }
    else if (protected_) {
        aiorun_counter_add(&rep->protected_abandoned, 1);
    }
}

/* Its description (a str: the repr, then the stack), for the JSON. */
void
aiorun_report_refused_text(RunObject *run, PyObject *description)
{
    aiorun_report *rep = &run->report;
    if (rep->path == NULL) {
        return;
    }
    PyObject *utf8 = PyUnicode_AsEncodedString(description, "utf-8", "backslashreplace");
    json_buf b = {utf8 ? PyMem_Malloc(AIORUN_REPORT_REFUSED_MAX) : NULL, 0,
                  AIORUN_REPORT_REFUSED_MAX, 0};
    if (b.buf == NULL) {
        if (utf8 != NULL) {
            PyErr_NoMemory();
        }
        Py_XDECREF(utf8);
        rep->refused_cut = 1;
        aiorun_keep_error(run, "The shutdown report");
        return;
    }
    b.buf[0] = '\0';
    puts_(&b, "{\"description\": ");
    put_string(&b, PyBytes_AS_STRING(utf8), (size_t)PyBytes_GET_SIZE(utf8));
    puts_(&b, "}");
    Py_DECREF(utf8);
    if (b.full) {
        rep->refused_cut = 1;
    }
    else {
        refused_append(rep, b.buf, b.len);
    }
    PyMem_Free(b.buf);
}
