/* A C-level signal handler in front of CPython's own, for the watchdog.
 *
 * CPython runs a Python signal handler only when the main thread next
 * executes bytecode, which never happens while the loop thread holds the
 * GIL in a C call.  The watchdog must still learn of SIGINT/SIGTERM at
 * once, so while it runs this handler is chained in front of CPython's: it
 * counts the signal, writes a byte to a pipe the watchdog polls, and then
 * calls CPython's handler, so Python sees every signal as before.
 *
 * Everything here is async-signal-safe: lock-free atomics, write(2), and
 * errno saved and restored.  This file holds the only static mutable state
 * of the extension, because a signal handler can reach nothing else. */
#include "aiorun.h"

#ifndef MS_WINDOWS

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

static const int chained_signals[] = {SIGINT, SIGTERM};
#define N_CHAINED (sizeof(chained_signals) / sizeof(chained_signals[0]))

/* CPython's handlers, saved when ours goes in front of them.  Written only
 * while our handler is not installed. */
static struct sigaction previous[N_CHAINED];
static int installed;
/* Who uses it (the watchdog, the health endpoint): the handler goes in with
 * the first and out with the last.  Main thread only. */
static int users;

static atomic_ulong signal_count;
static atomic_int last_signum;
/* The first signal since install and when it came (CLOCK_MONOTONIC, in ns):
 * the watchdog thread may first wake after a second one, and the request
 * dates from the first. */
#if ATOMIC_LLONG_LOCK_FREE == 2
#define RECORD_FIRST 1
static atomic_int first_signum;
static atomic_llong first_at_ns;
#endif
static atomic_int wake_write_fd = -1;

/* The pipe: made once per process (again in a forked child, which must not
 * share its parent's) and never closed, so that a handler running on
 * another thread can never write into a descriptor reused for a file. */
static int pipe_fds[2] = {-1, -1};
static pid_t pipe_pid;

static void
on_signal(int signum, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    atomic_fetch_add(&signal_count, 1);
    atomic_store(&last_signum, signum);
#ifdef RECORD_FIRST
    if (atomic_load(&first_at_ns) == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);   /* async-signal-safe */
        long long unset = 0;
        if (atomic_compare_exchange_strong(
                &first_at_ns, &unset, (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec)) {
            atomic_store(&first_signum, signum);
        }
    }
#endif
    int fd = atomic_load(&wake_write_fd);
    if (fd >= 0) {
        ssize_t written = write(fd, "s", 1);  /* full pipe: already awake */
        (void)written;
    }
    errno = saved_errno;
    for (size_t i = 0; i < N_CHAINED; i++) {
        if (chained_signals[i] != signum) {
            continue;
        }
        struct sigaction *prev = &previous[i];
        if (prev->sa_flags & SA_SIGINFO) {
            prev->sa_sigaction(signum, info, context);
        }
        else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
            prev->sa_handler(signum);
        }
    }
}

static int
make_pipe(void)
{
    pid_t pid = getpid();
    if (pipe_fds[0] >= 0 && pipe_pid == pid) {
        return 0;
    }
    if (pipe_fds[0] >= 0) {
        /* Inherited through fork(): the parent's watchdog listens there. */
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        pipe_fds[0] = pipe_fds[1] = -1;
    }
    int fds[2];
    if (pipe(fds) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        if (fcntl(fds[i], F_SETFD, FD_CLOEXEC) < 0
            || fcntl(fds[i], F_SETFL, O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            close(fds[0]);
            close(fds[1]);
            return -1;
        }
    }
    pipe_fds[0] = fds[0];
    pipe_fds[1] = fds[1];
    pipe_pid = pid;
    return 0;
}

int
aiorun_sigwake_install(int *read_fd, unsigned long *count_now)
{
    if (users > 0 && installed) {
        users++;
        *read_fd = pipe_fds[0];
        *count_now = atomic_load(&signal_count);
        return 0;
    }
    if (make_pipe() < 0) {
        return -1;
    }
    /* Stale bytes from an earlier run() would look like a signal. */
    char buf[64];
    while (read(pipe_fds[0], buf, sizeof(buf)) > 0) {
    }
#ifdef RECORD_FIRST
    atomic_store(&first_signum, 0);
    atomic_store(&first_at_ns, 0);
#endif
    atomic_store(&wake_write_fd, pipe_fds[1]);
    *read_fd = pipe_fds[0];
    *count_now = atomic_load(&signal_count);
    for (size_t i = 0; i < N_CHAINED; i++) {
        struct sigaction ours;
        if (sigaction(chained_signals[i], NULL, &previous[i]) < 0) {
            goto fail;
        }
        ours = previous[i];
        ours.sa_sigaction = on_signal;
        ours.sa_flags |= SA_SIGINFO;
        if (sigaction(chained_signals[i], &ours, NULL) < 0) {
            goto fail;
        }
        installed = (int)i + 1;
    }
    users = 1;
    return 0;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    aiorun_sigwake_uninstall();
    return -1;
}

int
aiorun_sigwake_after_fork(int *read_fd, unsigned long *count_now)
{
    if (make_pipe() < 0) {
        return -1;
    }
    atomic_store(&wake_write_fd, pipe_fds[1]);
    *read_fd = pipe_fds[0];
    *count_now = atomic_load(&signal_count);
    return 0;
}

void
aiorun_sigwake_uninstall(void)
{
    if (users > 1) {
        users--;
        return;
    }
    users = 0;
    for (int i = installed - 1; i >= 0; i--) {
        struct sigaction current;
        /* signal.signal() called during run() has replaced ours already:
         * then CPython's handler is in place and must stay. */
        if (sigaction(chained_signals[i], NULL, &current) == 0
            && (current.sa_flags & SA_SIGINFO)
            && current.sa_sigaction == on_signal) {
            (void)sigaction(chained_signals[i], &previous[i], NULL);
        }
    }
    installed = 0;
    atomic_store(&wake_write_fd, -1);
}

void
aiorun_sigwake_poke(void)
{
    int fd = atomic_load(&wake_write_fd);
    if (fd >= 0) {
        ssize_t written = write(fd, "p", 1);
        (void)written;
    }
}

unsigned long
aiorun_sigwake_count(void)
{
    return atomic_load(&signal_count);
}

int
aiorun_sigwake_last_signum(void)
{
    return atomic_load(&last_signum);
}

int
aiorun_sigwake_first_signum(double *at)
{
#ifdef RECORD_FIRST
    int signum = atomic_load(&first_signum);
    if (signum != 0) {
        *at = (double)atomic_load(&first_at_ns) / 1e9;
    }
    return signum;
#else
    (void)at;
    return 0;
#endif
}

#endif /* !MS_WINDOWS */
