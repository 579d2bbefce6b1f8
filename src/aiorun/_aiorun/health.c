/* The health endpoint: GET /readyz and GET /livez, answered by a thread of
 * our own that never runs Python and never takes the GIL.
 *
 * Readiness is two flags the loop's thread sets: ready (the moment READY=1
 * goes out, or aiorun.notify_ready()) and stopping (the shutdown's first
 * moment, before drain_delay).  Liveness is a heartbeat the loop writes
 * from a timer.  On builds with a GIL a second thread takes the GIL every
 * GIL_TICK_MS and notes since when it has been waiting: a loop that has not
 * beaten while that thread waits is stuck behind a call that holds the GIL;
 * one that has not beaten while the GIL changes hands is busy or blocked in
 * a call that lets the GIL go (a sleep, blocking I/O).
 *
 * Readiness also turns the moment a SIGINT/SIGTERM lands: sigwake.c's C
 * handler counts it before Python's handler can run.
 *
 * Bounded: at most MAX_CONNS connections, each read as it is accepted (a
 * probe's request is usually there already, and is answered at once); a
 * new one pushes out the oldest of an earlier round.  REQUEST_MAX bytes for
 * the request line and headers, READ_TIMEOUT_NS to send them, then one
 * answer and the close.  Nothing a client sends reaches Python. */
#include "aiorun.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define ADDRESS_ENV "AIORUN_HEALTH"
#define LIVENESS_ENV "AIORUN_LIVENESS_TIMEOUT"
#define DEFAULT_LIVENESS_TIMEOUT 10.0
/* Below this the heartbeat (a quarter of it, at least 12.5 ms) would be
 * the loop's main work. */
#define MIN_LIVENESS_TIMEOUT 0.05

#ifndef MS_WINDOWS

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 64
#define REQUEST_MAX 4096
#define READ_TIMEOUT_NS 2000000000LL
#define ACCEPTS_PER_ROUND 64
#define GIL_TICK_MS 100
/* Waiting this long for the GIL means its holder is not letting it go: at
 * least half a second, and a hundred switch intervals. */
#define GIL_HELD_NS 500000000LL
#define NS 1000000000LL

typedef struct {
    int fd;                 /* -1: free */
    long long since_ns;     /* accepted at */
    size_t len;
    char buf[REQUEST_MAX];
} probe_conn;

struct aiorun_probe {
    int listen_fd;
    int wake_fds[2];        /* a byte written: the threads return */
    pid_t pid;              /* the process that started the threads */
    pthread_t thread;
    pthread_t ticker;
    int ticker_started;
    atomic_int quit;
    atomic_int ready;
    atomic_int stopping;
    atomic_llong beat_ns;           /* the loop's last heartbeat */
    atomic_llong gil_wait_since_ns; /* the ticker waits since then, or 0 */
    atomic_uint *ready_calls;       /* the module's notify_ready() count */
    int sigwake_on;                 /* sigwake.c counts SIGINT/SIGTERM for us */
    unsigned long signals_base;     /* its count when the endpoint started */
    atomic_int stage;               /* the shutdown's stage, for /livez */
#ifndef PYPY_VERSION
    PyInterpreterState *interp;     /* the ticker's (the main one) */
#endif
    unsigned int ready_calls_base;
    long long stale_ns;             /* liveness_timeout */
    long long gil_held_ns;          /* waiting this long: the GIL is held */
    double beat_interval;
    long long backoff_until_ns;     /* no accept() before (out of fds) */
    char unix_path[PATH_MAX + 1];   /* absolute: the process may chdir() */
    dev_t unix_dev;
    ino_t unix_ino;
    probe_conn conns[MAX_CONNS];
};

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * NS + ts.tv_nsec;
}

/* ---- the answering thread ---- */

static void
conn_close(probe_conn *c)
{
    if (c->fd >= 0) {
        close(c->fd);
    }
    c->fd = -1;
    c->len = 0;
}

/* The shutdown has been asked for: run() has seen it, or a SIGINT/SIGTERM
 * has come, which sigwake.c counts in C the moment it lands, even while
 * the loop's thread is stuck in a call that holds the GIL. */
static int
is_stopping(aiorun_probe *p)
{
    return atomic_load(&p->stopping)
        || (p->sigwake_on && aiorun_sigwake_count() != p->signals_base);
}

static int
is_ready(aiorun_probe *p)
{
    if (is_stopping(p)) {
        return 0;
    }
    return atomic_load(&p->ready)
        || atomic_load(p->ready_calls) != p->ready_calls_base;
}

/* The body of /readyz or /livez; returns the status code. */
static int
probe_body(aiorun_probe *p, int live, char *body, size_t size)
{
    if (!live) {
        if (is_ready(p)) {
            snprintf(body, size, "ready\n");
            return 200;
        }
        snprintf(body, size, is_stopping(p) ? "stopping\n" : "starting\n");
        return 503;
    }
    long long beat = atomic_load(&p->beat_ns);
    long long now = now_ns();
    long long age = now > beat ? now - beat : 0;
    int stage = atomic_load(&p->stage);
    if (stage >= STAGE_HANDLER && stage <= STAGE_LEAVING) {
        /* Restarting a process that is shutting down would cut its drain
         * short: it stays alive, and shutdown_deadline bounds it. */
        snprintf(body, size, "alive: shutting down (%s); the loop ran %.1f s ago\n",
                 aiorun_phase_name(stage), (double)age / NS);
        return 200;
    }
    if (age <= p->stale_ns) {
        snprintf(body, size, "alive: the loop ran %.1f s ago\n", (double)age / NS);
        return 200;
    }
    long long since = atomic_load(&p->gil_wait_since_ns);
    long long held = since ? now - since : 0;
    if (held >= p->gil_held_ns) {
        snprintf(body, size,
                 "the loop has not run for %.1f s: a call has held the GIL for "
                 "%.1f s without letting it go\n", (double)age / NS, (double)held / NS);
    }
    else {
#ifdef Py_GIL_DISABLED
        snprintf(body, size, "the loop has not run for %.1f s\n", (double)age / NS);
#else
        snprintf(body, size,
                 "the loop has not run for %.1f s: its thread is busy, or blocked "
                 "in a call that lets the GIL go\n", (double)age / NS);
#endif
    }
    return 503;
}

static const char *
status_text(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    default: return "Service Unavailable";
    }
}

static void
respond(probe_conn *c, int status, int head_only, const char *body)
{
    char out[768];
    size_t blen = strlen(body);
    int n = snprintf(out, sizeof out,
                     "HTTP/1.1 %d %s\r\n"
                     "Content-Type: text/plain; charset=utf-8\r\n"
                     "Content-Length: %zu\r\n"
                     "Cache-Control: no-store\r\n"
                     "%s"
                     "Connection: close\r\n\r\n%s",
                     status, status_text(status), blen,
                     status == 405 ? "Allow: GET, HEAD\r\n" : "",
                     head_only ? "" : body);
    if (n > 0 && (size_t)n < sizeof out) {
        int flags = MSG_DONTWAIT;
#ifdef MSG_NOSIGNAL
        flags |= MSG_NOSIGNAL;
#endif
        /* A fresh socket's send buffer takes a few hundred bytes at once;
         * a client that cannot take them gets less, never a wait. */
        (void)send(c->fd, out, (size_t)n, flags);
        shutdown(c->fd, SHUT_WR);
    }
    conn_close(c);
}

static int
token_is(const char *s, size_t len, const char *word)
{
    return len == strlen(word) && memcmp(s, word, len) == 0;
}

/* The request's line and headers are in; answer it. */
static void
answer(aiorun_probe *p, probe_conn *c)
{
    const char *line = c->buf;
    const char *eol = memchr(line, '\n', c->len);
    size_t len = (size_t)(eol - line);
    if (len > 0 && line[len - 1] == '\r') {
        len--;
    }
    /* METHOD SP TARGET SP HTTP/1.x; a HEAD gets no body, whatever the answer. */
    const char *sp1 = memchr(line, ' ', len);
    int head = sp1 != NULL && token_is(line, (size_t)(sp1 - line), "HEAD");
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', len - (size_t)(sp1 + 1 - line)) : NULL;
    if (sp1 == NULL || sp2 == NULL || sp1 == line || sp2 == sp1 + 1
        || (size_t)(line + len - (sp2 + 1)) != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        respond(c, 400, head, "bad request\n");
        return;
    }
    size_t mlen = (size_t)(sp1 - line);
    const char *target = sp1 + 1;
    size_t tlen = (size_t)(sp2 - target);
    const char *query = memchr(target, '?', tlen);
    if (query != NULL) {
        tlen = (size_t)(query - target);
    }
    int live = token_is(target, tlen, "/livez");
    if (!live && !token_is(target, tlen, "/readyz")) {
        respond(c, 404, head, "not found: GET /readyz or /livez\n");
        return;
    }
    if (!head && !token_is(line, mlen, "GET")) {
        respond(c, 405, 0, "method not allowed\n");
        return;
    }
    char body[256];
    int status = probe_body(p, live, body, sizeof body);
    respond(c, status, head, body);
}

/* The end of the headers: a blank line. */
static int
headers_complete(const char *buf, size_t len, size_t from)
{
    for (size_t i = from > 3 ? from - 3 : 0; i < len; i++) {
        if (buf[i] != '\n') {
            continue;
        }
        if (i + 1 < len && buf[i + 1] == '\n') {
            return 1;
        }
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n') {
            return 1;
        }
    }
    return 0;
}

static void
conn_read(aiorun_probe *p, probe_conn *c)
{
    size_t before = c->len;
    ssize_t n = recv(c->fd, c->buf + c->len, REQUEST_MAX - c->len, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        return;
    }
    if (n <= 0) {
        conn_close(c);
        return;
    }
    c->len += (size_t)n;
    if (headers_complete(c->buf, c->len, before)) {
        answer(p, c);
    }
    else if (c->len == REQUEST_MAX) {
        respond(c, 431, 0, "request line and headers too large\n");
    }
}

/* A free slot, else the oldest connection accepted before this round (one
 * of this round may be a probe not read yet); NULL when all are of this
 * round: then the new one is turned away. */
static probe_conn *
free_or_oldest(aiorun_probe *p, long long now)
{
    probe_conn *oldest = NULL;
    for (int i = 0; i < MAX_CONNS; i++) {
        probe_conn *c = &p->conns[i];
        if (c->fd < 0) {
            return c;
        }
        if (c->since_ns < now && (oldest == NULL || c->since_ns < oldest->since_ns)) {
            oldest = c;
        }
    }
    if (oldest != NULL) {
        conn_close(oldest);
    }
    return oldest;
}

static void
accept_some(aiorun_probe *p, long long now)
{
    for (int i = 0; i < ACCEPTS_PER_ROUND; i++) {
#ifdef __linux__
        int fd = accept4(p->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
        int fd = accept(p->listen_fd, NULL, NULL);
        if (fd >= 0) {
            fcntl(fd, F_SETFD, FD_CLOEXEC);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        }
#endif
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS
                || errno == ENOMEM) {
                /* The process is out of descriptors: the waiting client
                 * stays queued; try again a little later, not in a spin. */
                p->backoff_until_ns = now + NS / 10;
            }
            return;
        }
        probe_conn *c = free_or_oldest(p, now);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->since_ns = now;
        c->len = 0;
        /* A probe's request is often there already: answered now, its
         * slot is free again before the next accept. */
        conn_read(p, c);
    }
}

static void *
server_main(void *arg)
{
    aiorun_probe *p = arg;
    struct pollfd fds[2 + MAX_CONNS];
    probe_conn *polled[MAX_CONNS];
    aiorun_block_signals(0);
    while (!atomic_load(&p->quit)) {
        long long now = now_ns();
        int timeout_ms = -1;
        nfds_t n = 0;
        fds[n++] = (struct pollfd){.fd = p->wake_fds[0], .events = POLLIN};
        int accepting = now >= p->backoff_until_ns;
        fds[n++] = (struct pollfd){.fd = accepting ? p->listen_fd : -1, .events = POLLIN};
        if (!accepting) {
            timeout_ms = (int)((p->backoff_until_ns - now) / 1000000) + 1;
        }
        int k = 0;
        for (int i = 0; i < MAX_CONNS; i++) {
            probe_conn *c = &p->conns[i];
            if (c->fd < 0) {
                continue;
            }
            long long left = c->since_ns + READ_TIMEOUT_NS - now;
            if (left <= 0) {
                conn_close(c);   /* too slow: no answer */
                continue;
            }
            int ms = (int)(left / 1000000) + 1;
            if (timeout_ms < 0 || ms < timeout_ms) {
                timeout_ms = ms;
            }
            polled[k++] = c;
            fds[n++] = (struct pollfd){.fd = c->fd, .events = POLLIN};
        }
        int ready = poll(fds, n, timeout_ms);
        if (ready < 0) {
            continue;   /* EINTR; nothing else can fail here */
        }
        if (fds[0].revents) {
            break;
        }
        for (int i = 0; i < k; i++) {
            if (fds[2 + i].revents) {
                conn_read(p, polled[i]);
            }
        }
        if (fds[1].revents & POLLIN) {
            accept_some(p, now_ns());
        }
    }
    for (int i = 0; i < MAX_CONNS; i++) {
        conn_close(&p->conns[i]);
    }
    return NULL;
}

#ifndef Py_GIL_DISABLED
/* Takes the GIL every GIL_TICK_MS, noting since when it waits for it.  A
 * thread state of its own, made once: no allocation per tick, and none
 * that can fail fatally (PyGILState_Ensure() aborts when it cannot make
 * one).  Without one, /livez only cannot name a held GIL. */
static void *
ticker_main(void *arg)
{
    aiorun_probe *p = arg;
    aiorun_block_signals(0);
    struct pollfd wake = {.fd = p->wake_fds[0], .events = POLLIN};
#ifdef PYPY_VERSION
    while (!atomic_load(&p->quit)) {
        if (poll(&wake, 1, GIL_TICK_MS) > 0 || atomic_load(&p->quit)) {
            break;
        }
        atomic_store(&p->gil_wait_since_ns, now_ns());
        PyGILState_STATE gil = PyGILState_Ensure();
        atomic_store(&p->gil_wait_since_ns, 0);
        PyGILState_Release(gil);
    }
#else
    PyThreadState *ts = PyThreadState_New(p->interp);
    if (ts == NULL) {
        return NULL;
    }
    while (!atomic_load(&p->quit)) {
        if (poll(&wake, 1, GIL_TICK_MS) > 0 || atomic_load(&p->quit)) {
            break;
        }
        atomic_store(&p->gil_wait_since_ns, now_ns());
        PyEval_RestoreThread(ts);
        atomic_store(&p->gil_wait_since_ns, 0);
        (void)PyEval_SaveThread();
    }
    PyEval_RestoreThread(ts);
    PyThreadState_Clear(ts);
    PyThreadState_DeleteCurrent();
#endif
    return NULL;
}
#endif

/* ---- set-up, from run() ---- */

static int
set_os_error(int err, const char *what, PyObject *where)
{
    PyObject *text = PyUnicode_FromFormat("health endpoint: %s %R: %s", what, where,
                                          strerror(err));
    PyObject *exc = text ? PyObject_CallFunction(PyExc_OSError, "iO", err, text) : NULL;
    Py_XDECREF(text);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

static int
usage_error(const char *source, PyObject *value)
{
    PyErr_Format(PyExc_ValueError,
                 "%s must be 'HOST:PORT', ':PORT', a port number or a unix socket "
                 "path (with a '/'), not %R", source, value);
    return -1;
}

/* 0 if nobody listens on the socket file at addr (connecting is refused:
 * its process is gone), 1 if someone does or it cannot be told. */
static int
socket_is_live(const struct sockaddr_un *addr)
{
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (probe < 0) {
        return 1;
    }
    int refused = connect(probe, (const struct sockaddr *)addr, sizeof *addr) < 0
                  && errno == ECONNREFUSED;
    close(probe);
    return !refused;
}

static int
is_stale_socket(const char *path, const struct sockaddr_un *addr)
{
    struct stat sb;
    return lstat(path, &sb) == 0 && S_ISSOCK(sb.st_mode) && !socket_is_live(addr);
}

static int
unix_address(struct sockaddr_un *addr, const char *path)
{
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr->sun_path) {
        return -1;
    }
    strcpy(addr->sun_path, path);
    return 0;
}

/* The socket is bound and listening under a name of its own first, then
 * linked to path: a client never finds the path bound but not listening,
 * and a socket file is replaced only when nobody listens on it (a process
 * that is gone), never one another instance is setting up.  A path too
 * long for the extra name is bound directly. */
static int
listen_unix(aiorun_probe *p, const char *path, PyObject *where)
{
    struct sockaddr_un addr, tmp;
    char tmp_path[sizeof addr.sun_path + 32];
    if (unix_address(&addr, path) < 0) {
        PyErr_Format(PyExc_ValueError, "health endpoint: the unix socket path %R is "
                     "longer than %d bytes", where, (int)sizeof addr.sun_path - 1);
        return -1;
    }
    snprintf(tmp_path, sizeof tmp_path, "%s.%ld~", path, (long)getpid());
    int staged = unix_address(&tmp, tmp_path) == 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return set_os_error(errno, "cannot make a socket for", where);
    }
    int rc, err = 0;
    if (staged) {
        unlink(tmp_path);   /* left by a process of this pid before */
        rc = bind(fd, (struct sockaddr *)&tmp, sizeof tmp) == 0 && listen(fd, 128) == 0
            ? 0 : -1;
        if (rc == 0 && link(tmp_path, path) < 0) {
            if (errno != EEXIST) {
                rc = -1;
            }
            else if (is_stale_socket(path, &addr)) {
                rc = rename(tmp_path, path);
            }
            else {
                struct stat there;
                rc = -1;   /* a file that is not a socket is no address in use */
                errno = lstat(path, &there) == 0 && !S_ISSOCK(there.st_mode)
                    ? EEXIST : EADDRINUSE;
            }
        }
        err = errno;
        unlink(tmp_path);   /* after a rename: gone already */
    }
    else {
        rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
        if (rc < 0 && errno == EADDRINUSE && is_stale_socket(path, &addr)) {
            unlink(path);
            rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
        }
        else if (rc < 0) {
            errno = errno == EEXIST ? EADDRINUSE : errno;
        }
        rc = rc == 0 ? listen(fd, 128) : rc;
        err = errno;
    }
    struct stat sb;
    if (rc < 0 || stat(path, &sb) < 0) {
        err = rc < 0 ? err : errno;
        close(fd);
        return set_os_error(err, "cannot listen on", where);
    }
    char cwd[PATH_MAX + 1] = "";
    if (path[0] != '/' && getcwd(cwd, sizeof cwd - 1) != NULL) {
        strcat(cwd, "/");
    }
    snprintf(p->unix_path, sizeof p->unix_path, "%s%s", cwd,
             cwd[0] != '\0' && strncmp(path, "./", 2) == 0 ? path + 2 : path);
    p->unix_dev = sb.st_dev;
    p->unix_ino = sb.st_ino;
    p->listen_fd = fd;
    return 0;
}

/* host:port, [v6]:port, :port or port, split: host gets 127.0.0.1 when
 * none is given.  0, or -1 (no exception) when it is none of them. */
static int
split_inet(const char *text, char host[256], const char **port)
{
    strcpy(host, "127.0.0.1");
    *port = text;
    const char *colon = strrchr(text, ':');
    if (colon != NULL) {
        const char *h = text;
        size_t hlen = (size_t)(colon - text);
        if (hlen >= 2 && h[0] == '[' && h[hlen - 1] == ']') {
            if (hlen == 2) {
                return -1;   /* "[]" names no host */
            }
            h++;
            hlen -= 2;
        }
        else if (memchr(h, ':', hlen) != NULL) {
            return -1;   /* an IPv6 address needs [] */
        }
        if (hlen >= 256) {
            return -1;
        }
        if (hlen > 0) {
            memcpy(host, h, hlen);
            host[hlen] = '\0';
        }
        *port = colon + 1;
    }
    const char *pt = *port;
    return *pt == '\0' || strspn(pt, "0123456789") != strlen(pt) || strlen(pt) > 5
           || atoi(pt) > 65535 ? -1 : 0;
}

/* The address as text, checked for its form: 0, or -1 with the ValueError
 * (an embedded NUL, a lone surrogate, no HOST:PORT form). */
static int
check_inet(PyObject *where, const char *source)
{
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(where, &size);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            return -1;
        }
        PyErr_Clear();   /* a lone surrogate: no host name has one */
        return usage_error(source, where);
    }
    char host[256];
    const char *port;
    if (strlen(text) != (size_t)size || split_inet(text, host, &port) < 0) {
        return usage_error(source, where);
    }
    return 0;
}

static int
listen_inet(aiorun_probe *p, const char *text, PyObject *where)
{
    char host[256];
    const char *port;
    if (split_inet(text, host, &port) < 0) {
        PyErr_SetString(PyExc_SystemError, "health endpoint: an address not checked");
        return -1;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai;
    Py_BEGIN_ALLOW_THREADS
    gai = getaddrinfo(host, port, &hints, &res);
    Py_END_ALLOW_THREADS
    if (gai != 0) {
        PyErr_Format(PyExc_OSError, "health endpoint: cannot resolve %R: %s", where,
                     gai_strerror(gai));
        return -1;
    }
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
    int one = 1;
    int ok = fd >= 0
        && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0
        && bind(fd, res->ai_addr, res->ai_addrlen) == 0
        && listen(fd, 128) == 0;
    int err = errno;
    freeaddrinfo(res);
    if (!ok) {
        if (fd >= 0) {
            close(fd);
        }
        return set_os_error(err, "cannot listen on", where);
    }
    p->listen_fd = fd;
    return 0;
}

/* What the endpoint listens on, as the log line and the docs write it. */
static PyObject *
bound_address(aiorun_probe *p)
{
    if (p->unix_path[0] != '\0') {
        return PyUnicode_DecodeFSDefault(p->unix_path);
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (getsockname(p->listen_fd, (struct sockaddr *)&ss, &sl) < 0
        || getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, serv, sizeof serv,
                       NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        return PyUnicode_FromString("?");
    }
    return PyUnicode_FromFormat(ss.ss_family == AF_INET6 ? "http://[%s]:%s"
                                                         : "http://%s:%s", host, serv);
}

/* The socket file, if it is still the one this endpoint made. */
static void
unlink_own_socket(aiorun_probe *p)
{
    struct stat sb;
    if (p->unix_path[0] != '\0' && stat(p->unix_path, &sb) == 0
        && sb.st_dev == p->unix_dev && sb.st_ino == p->unix_ino) {
        unlink(p->unix_path);
    }
}

static void
probe_free(aiorun_probe *p)
{
    if (p->listen_fd >= 0) {
        close(p->listen_fd);
    }
    for (int i = 0; i < 2; i++) {
        if (p->wake_fds[i] >= 0) {
            close(p->wake_fds[i]);
        }
    }
    PyMem_RawFree(p);
}

static int
start_threads(aiorun_probe *p)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&p->thread, NULL, server_main, p);
#ifndef Py_GIL_DISABLED
    if (rc == 0) {
        rc = pthread_create(&p->ticker, NULL, ticker_main, p);
        if (rc != 0) {
            atomic_store(&p->quit, 1);
            (void)!write(p->wake_fds[1], "", 1);
            pthread_join(p->thread, NULL);
        }
        else {
            p->ticker_started = 1;
        }
    }
#endif
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#ifdef __linux__
    if (rc == 0) {
        pthread_setname_np(p->thread, "aiorun-health");
#ifndef Py_GIL_DISABLED
        pthread_setname_np(p->ticker, "aiorun-gil-tick");
#endif
    }
#endif
    return rc;
}

#endif /* !MS_WINDOWS */

/* ---- the arguments ---- */

/* health: None, a port number, or a str/path-like address; the parameter
 * wins over AIORUN_HEALTH, read only when use_env.  *address is a new
 * str, or NULL for no endpoint; *source names where it came from. */
static int
read_address(aiorun_state *st, PyObject *health, int use_env, PyObject **address,
             const char **source)
{
    *address = NULL;
    *source = "run() argument 'health'";
    if (health == Py_None) {
        if (!use_env) {
            return 0;
        }
        PyObject *value;
        int rc = aiorun_getenv(st, ADDRESS_ENV, &value);
        if (rc <= 0) {
            return rc;
        }
        *source = "environment variable " ADDRESS_ENV;
        *address = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(value),
                                                    PyBytes_GET_SIZE(value));
        Py_DECREF(value);
        if (*address != NULL && PyUnicode_GET_LENGTH(*address) == 0) {
            Py_CLEAR(*address);   /* set but empty: off */
        }
        return *address == NULL && PyErr_Occurred() ? -1 : 0;
    }
    if (PyBool_Check(health)) {
        goto type_error;
    }
    if (PyLong_Check(health)) {
        long port = PyLong_AsLong(health);
        if (port == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return -1;
            }
            PyErr_Clear();
        }
        if (port < 0 || port > 65535) {
            PyErr_Format(PyExc_ValueError,
                         "run() argument 'health' must be a port from 0 to 65535, not %R",
                         health);
            return -1;
        }
        *address = PyUnicode_FromFormat(":%ld", port);
        return *address == NULL ? -1 : 0;
    }
    PyObject *path = PyOS_FSPath(health);
    if (path == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            return -1;
        }
        PyErr_Clear();
        goto type_error;
    }
    if (!PyUnicode_Check(path)) {
        Py_DECREF(path);
        goto type_error;
    }
    Py_ssize_t slash = PyUnicode_FindChar(path, '/', 0, PyUnicode_GET_LENGTH(path), 1);
    if (slash == -2) {
        Py_DECREF(path);
        return -1;
    }
    if (slash == -1 && !PyUnicode_Check(health)) {
        /* A path object names a file even without a '/' in it. */
        Py_SETREF(path, PyUnicode_FromFormat("./%U", path));
    }
    *address = path;
    return *address == NULL ? -1 : 0;
type_error:
    PyErr_Format(PyExc_TypeError,
                 "run() argument 'health' must be str, int, os.PathLike or None, "
                 "not %.200s", Py_TYPE(health)->tp_name);
    return -1;
}

static int
read_liveness(aiorun_state *st, PyObject *timeout, int use_env, double *seconds)
{
    *seconds = DEFAULT_LIVENESS_TIMEOUT;
    if (timeout != Py_None) {
        if (PyBool_Check(timeout) || !(PyLong_Check(timeout) || PyFloat_Check(timeout))) {
            PyErr_Format(PyExc_TypeError,
                         "run() argument 'liveness_timeout' must be a number of seconds "
                         "or None, not %.200s", Py_TYPE(timeout)->tp_name);
            return -1;
        }
        double s = PyFloat_AsDouble(timeout);
        if (s == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (isnan(s) || s < MIN_LIVENESS_TIMEOUT) {
            PyErr_Format(PyExc_ValueError,
                         "run() argument 'liveness_timeout' must be a number of "
                         "seconds >= 0.05 (the heartbeat's pace), not %R", timeout);
            return -1;
        }
        *seconds = s;
        return 0;
    }
    if (!use_env) {
        return 0;
    }
    PyObject *value;
    int rc = aiorun_getenv(st, LIVENESS_ENV, &value);
    if (rc <= 0) {
        return rc;
    }
    const char *text = PyBytes_AS_STRING(value);
    char *end;
    double s = strtod(text, &end);
    if (end == text || *end != '\0' || isnan(s) || s < MIN_LIVENESS_TIMEOUT
        || strspn(text, "0123456789.eE+-") != strlen(text)) {
        PyErr_Format(PyExc_ValueError,
                     "environment variable " LIVENESS_ENV " must be a number of "
                     "seconds >= 0.05, not '%.100s'", text);
        Py_DECREF(value);
        return -1;
    }
    Py_DECREF(value);
    *seconds = s;
    return 0;
}

int
aiorun_health_check(aiorun_state *st, PyObject *health, PyObject *liveness_timeout,
                    int use_env, aiorun_health_args *out)
{
    out->address = NULL;
    out->source = NULL;
    /* The variable is read only for an endpoint: a stray one cannot make a
     * run() without it fail. */
    if (read_address(st, health, use_env, &out->address, &out->source) < 0
        || read_liveness(st, liveness_timeout, use_env && out->address != NULL,
                         &out->liveness_timeout) < 0) {
        Py_CLEAR(out->address);
        return -1;
    }
#ifdef MS_WINDOWS
    if (out->address != NULL) {
        PyErr_Format(PyExc_NotImplementedError,
                     "%s: the health endpoint is not available on Windows", out->source);
        Py_CLEAR(out->address);
        return -1;
    }
#else
    if (out->address != NULL) {
        Py_ssize_t slash = PyUnicode_FindChar(out->address, '/', 0,
                                              PyUnicode_GET_LENGTH(out->address), 1);
        if (slash == -2 || (slash == -1 && check_inet(out->address, out->source) < 0)) {
            Py_CLEAR(out->address);
            return -1;
        }
    }
#endif
    return 0;
}

#ifndef MS_WINDOWS

int
aiorun_health_start(RunObject *run, aiorun_health_args *args)
{
    PyObject *where = args->address;
    if (where == NULL) {
        return 0;
    }
    Py_ssize_t slash = PyUnicode_FindChar(where, '/', 0, PyUnicode_GET_LENGTH(where), 1);
    if (slash == -2) {
        return -1;
    }
    if (aiorun_register_fork_hook(run->state) < 0) {
        return -1;
    }
    aiorun_probe *p = PyMem_RawCalloc(1, sizeof(*p));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->listen_fd = -1;
    p->wake_fds[0] = p->wake_fds[1] = -1;
    for (int i = 0; i < MAX_CONNS; i++) {
        p->conns[i].fd = -1;
    }
    p->pid = getpid();
    /* Beyond ~292 years a count of ns does not fit: never stale, then. */
    p->stale_ns = args->liveness_timeout >= 9.0e9 ? LLONG_MAX
                                                   : (long long)(args->liveness_timeout * NS);
    p->beat_interval = fmin(fmax(args->liveness_timeout / 4, 0.0125), 1.0);
    atomic_init(&p->quit, 0);
    atomic_init(&p->ready, 0);
    atomic_init(&p->stopping, run->shutdown_requested);
    atomic_init(&p->beat_ns, now_ns());
    atomic_init(&p->gil_wait_since_ns, 0);
    atomic_init(&p->stage, STAGE_STARTING);
    p->ready_calls = &run->state->ready_calls;
#ifndef PYPY_VERSION
    p->interp = PyInterpreterState_Get();
#endif
    p->gil_held_ns = GIL_HELD_NS;
    /* Held across the call: it may replace itself in sys. */
    PyObject *sys_get = PySys_GetObject("getswitchinterval");
    Py_XINCREF(sys_get);
    PyObject *interval = sys_get ? PyObject_CallNoArgs(sys_get) : NULL;
    Py_XDECREF(sys_get);
    if (interval != NULL && PyFloat_Check(interval)
        && PyFloat_AS_DOUBLE(interval) * 100 * NS > (double)GIL_HELD_NS
        && PyFloat_AS_DOUBLE(interval) < 1e6) {
        p->gil_held_ns = (long long)(PyFloat_AS_DOUBLE(interval) * 100 * NS);
    }
    Py_XDECREF(interval);
    if (PyErr_Occurred()) {
        probe_free(p);
        return -1;
    }
    p->ready_calls_base = atomic_load(p->ready_calls);

    int rc;
    if (slash >= 0) {
        PyObject *bytes = PyUnicode_EncodeFSDefault(where);
        if (bytes == NULL) {
            probe_free(p);
            return -1;
        }
        if (strlen(PyBytes_AS_STRING(bytes)) != (size_t)PyBytes_GET_SIZE(bytes)) {
            Py_DECREF(bytes);
            probe_free(p);
            return usage_error(args->source, where);
        }
        rc = listen_unix(p, PyBytes_AS_STRING(bytes), where);
        Py_DECREF(bytes);
    }
    else {
        const char *text = PyUnicode_AsUTF8(where);   /* checked already */
        rc = text == NULL ? -1 : listen_inet(p, text, where);
    }
    if (rc < 0) {
        probe_free(p);
        return -1;
    }
#ifdef __linux__
    if (pipe2(p->wake_fds, O_CLOEXEC) < 0) {
#else
    if (pipe(p->wake_fds) < 0) {
#endif
        set_os_error(errno, "cannot make a pipe for", where);
        goto fail;
    }
    fcntl(p->wake_fds[0], F_SETFD, FD_CLOEXEC);
    fcntl(p->wake_fds[1], F_SETFD, FD_CLOEXEC);
    fcntl(p->listen_fd, F_SETFL, fcntl(p->listen_fd, F_GETFL) | O_NONBLOCK);
    int sigwake_fd;
    if (aiorun_sigwake_install(&sigwake_fd, &p->signals_base) < 0) {
        goto fail;
    }
    p->sigwake_on = 1;
    rc = start_threads(p);
    if (rc != 0) {
        set_os_error(rc, "cannot start the thread for", where);
        goto fail;
    }
    run->health = p;
    PyObject *shown = bound_address(p);
    if (shown == NULL
        || aiorun_log_exc(run->state, LOG_INFO,
                          "Health endpoint on %s: GET /readyz, GET /livez", shown,
                          NULL) < 0) {
        Py_XDECREF(shown);
        return -1;   /* run->health is set: aiorun_health_stop() ends it */
    }
    Py_DECREF(shown);
    return 0;
fail:
    unlink_own_socket(p);
    if (p->sigwake_on) {
        aiorun_sigwake_uninstall();
    }
    probe_free(p);
    return -1;
}

static PyObject *
schedule_beat(RunObject *run, double delay)
{
    PyObject *beat = aiorun_run_method(run, "_health_beat");
    if (beat == NULL) {
        return NULL;
    }
    PyObject *handle = PyObject_CallMethod(run->loop, "call_later", "dO", delay, beat);
    Py_DECREF(beat);
    return handle;
}

int
aiorun_health_loop_ready(RunObject *run)
{
    if (run->health == NULL) {
        return 0;
    }
    PyObject *timer = schedule_beat(run, 0);
    if (timer == NULL) {
        return -1;
    }
    Py_XSETREF(run->health_timer, timer);
    return 0;
}

PyObject *
aiorun_run_health_beat(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    aiorun_probe *p = run->health;
    if (p == NULL || run->phase == PHASE_DONE) {
        Py_CLEAR(run->health_timer);
        Py_RETURN_NONE;
    }
    atomic_store(&p->beat_ns, now_ns());
    PyObject *next = schedule_beat(run, p->beat_interval);
    Py_XSETREF(run->health_timer, next);
    if (next == NULL) {
        return NULL;   /* the loop logs it; /livez then says the loop is stuck */
    }
    Py_RETURN_NONE;
}

void
aiorun_health_ready(RunObject *run)
{
    if (run->health != NULL) {
        atomic_store(&run->health->ready, 1);
    }
}

void
aiorun_health_stopping(RunObject *run)
{
    if (run->health != NULL) {
        atomic_store(&run->health->stopping, 1);
    }
}

void
aiorun_health_stage(RunObject *run, int stage)
{
    if (run->health != NULL) {
        atomic_store(&run->health->stage, stage);
        if (stage >= STAGE_HANDLER) {
            atomic_store(&run->health->stopping, 1);
        }
    }
}

void
aiorun_health_after_fork(RunObject *run)
{
    aiorun_probe *p = run->health;
    if (p == NULL || p->pid == getpid()) {
        return;
    }
    /* The threads stayed in the parent, and the socket is the parent's to
     * answer on: this process lets go of its copies at once, so that a
     * long-lived child never keeps the port after the parent is gone.  The
     * connections are left alone: the parent's thread may have been
     * closing one as it forked, and its number may be another file's now. */
    if (p->listen_fd >= 0) {
        close(p->listen_fd);
        p->listen_fd = -1;
    }
    for (int i = 0; i < 2; i++) {
        if (p->wake_fds[i] >= 0) {
            close(p->wake_fds[i]);
            p->wake_fds[i] = -1;
        }
    }
}

void
aiorun_health_stop(RunObject *run)
{
    aiorun_probe *p = run->health;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (run->health_timer != NULL) {
        PyObject *res = PyObject_CallMethod(run->health_timer, "cancel", NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(run->health_timer);
        }
        Py_XDECREF(res);
        Py_CLEAR(run->health_timer);
    }
    if (p != NULL) {
        run->health = NULL;
        if (p->pid == getpid()) {
            atomic_store(&p->quit, 1);
            (void)!write(p->wake_fds[1], "", 1);
            /* The ticker may be waiting for the GIL: let it have it. */
            Py_BEGIN_ALLOW_THREADS
            pthread_join(p->thread, NULL);
            if (p->ticker_started) {
                pthread_join(p->ticker, NULL);
            }
            Py_END_ALLOW_THREADS
            unlink_own_socket(p);
        }
        else {
            aiorun_health_after_fork(run);   /* a child: the parent's threads */
        }
        if (p->sigwake_on) {
            aiorun_sigwake_uninstall();
        }
        probe_free(p);
    }
    PyErr_Restore(type, value, tb);
}

#else /* MS_WINDOWS: refused by aiorun_health_check() */

int
aiorun_health_start(RunObject *run, aiorun_health_args *args)
{
    (void)run;
    (void)args;
    return 0;
}

int
aiorun_health_loop_ready(RunObject *run)
{
    (void)run;
    return 0;
}

PyObject *
aiorun_run_health_beat(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

void
aiorun_health_ready(RunObject *run)
{
    (void)run;
}

void
aiorun_health_stopping(RunObject *run)
{
    (void)run;
}

void
aiorun_health_stage(RunObject *run, int stage)
{
    (void)run;
    (void)stage;
}

void
aiorun_health_after_fork(RunObject *run)
{
    (void)run;
}

void
aiorun_health_stop(RunObject *run)
{
    Py_CLEAR(run->health_timer);
}

#endif /* MS_WINDOWS */
