/* reap_orphans: as PID 1 of a container without an init, every orphaned
 * process of the container becomes our child, and its exit leaves a
 * zombie that nobody else will ever wait for.
 *
 * A zombie child is reaped only once it has stayed a zombie from one look
 * to the next, a second apart (same pid, same start time).  Whoever waits
 * for their own children (asyncio's child watchers, uvloop, subprocess.run,
 * Popen.wait) has taken the exit status long before that, so it is never
 * stolen from them.  No SIGCHLD handler is installed: asyncio and uvloop
 * may have their own.  The looks are taken on the loop, by a timer: a loop
 * too busy to look is also a loop whose own watchers have not run yet.
 *
 * Children are found in /proc (Linux): /proc/<pid>/stat gives the state,
 * the parent and the start time. */
#include "aiorun.h"

#define REAP_INTERVAL 1.0   /* seconds between two looks */

#ifdef __linux__
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    pid_t pid;
    unsigned long long start;   /* clock ticks after boot: tells pid reuse */
} zombie;

struct aiorun_reaper {
    pid_t self;
    zombie *seen;               /* the zombies of the last look */
    size_t n_seen;
};

/* The state, parent and start time of a process from /proc/<pid>/stat;
 * 0, or -1 if it is gone or unreadable. */
static int
read_stat(const char *pid, char *state, pid_t *ppid, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%s/stat", pid);
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        return -1;
    }
    size_t len = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[len] = '\0';
    /* "pid (comm) S ppid ...": comm may hold spaces and parentheses. */
    char *after = strrchr(buf, ')');
    int ppid_ = 0;
    if (after == NULL
        || sscanf(after + 1, " %c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u"
                             " %*d %*d %*d %*d %*d %*d %llu", state, &ppid_, start) != 3) {
        return -1;
    }
    *ppid = (pid_t)ppid_;
    return 0;
}

/* The zombie children of `self` now, in a new array (*n of them); NULL
 * with *n = 0 when there are none or memory ran out (no look this time). */
static zombie *
find_zombies(pid_t self, size_t *n)
{
    zombie *found = NULL;
    size_t cap = 0;
    *n = 0;
    DIR *proc = opendir("/proc");
    if (proc == NULL) {
        return NULL;
    }
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        if (entry->d_name[0] < '1' || entry->d_name[0] > '9') {
            continue;
        }
        char state;
        pid_t ppid;
        unsigned long long start;
        if (read_stat(entry->d_name, &state, &ppid, &start) < 0
            || state != 'Z' || ppid != self) {
            continue;
        }
        if (*n == cap) {
            size_t bigger = cap ? cap * 2 : 16;
            zombie *grown = PyMem_RawRealloc(found, bigger * sizeof(*found));
            if (grown == NULL) {
                break;   /* reap what was found; the rest next time */
            }
            found = grown;
            cap = bigger;
        }
        found[*n].pid = (pid_t)atol(entry->d_name);
        found[*n].start = start;
        (*n)++;
    }
    closedir(proc);
    return found;
}

static int
was_seen(const aiorun_reaper *rp, const zombie *z)
{
    for (size_t i = 0; i < rp->n_seen; i++) {
        if (rp->seen[i].pid == z->pid && rp->seen[i].start == z->start) {
            return 1;
        }
    }
    return 0;
}

static int
log_reaped(RunObject *run, pid_t pid, int status)
{
    PyObject *text;
    if (WIFSIGNALED(status)) {
        text = PyUnicode_FromFormat("Reaped orphaned process %d (killed by signal %d)",
                                    (int)pid, WTERMSIG(status));
    }
    else {
        text = PyUnicode_FromFormat("Reaped orphaned process %d (exit code %d)",
                                    (int)pid, WEXITSTATUS(status));
    }
    if (text == NULL) {
        return -1;
    }
    int rc = aiorun_log_exc(run->state, LOG_DEBUG, "%s", text, NULL);
    Py_DECREF(text);
    return rc;
}

/* One look: reap the zombies that were zombies last time too. */
static int
reap_once(RunObject *run)
{
    aiorun_reaper *rp = run->reaper;
    size_t n;
    zombie *now;
    Py_BEGIN_ALLOW_THREADS
    now = find_zombies(rp->self, &n);
    Py_END_ALLOW_THREADS
    size_t kept = 0;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        int status;
        if (was_seen(rp, &now[i]) && waitpid(now[i].pid, &status, WNOHANG) == now[i].pid) {
            if (rc == 0) {
                rc = log_reaped(run, now[i].pid, status);
            }
            continue;
        }
        now[kept++] = now[i];   /* new, or someone else's for now */
    }
    PyMem_RawFree(rp->seen);
    rp->seen = now;
    rp->n_seen = kept;
    return rc;
}

static int
schedule(RunObject *run)
{
    PyObject *again = aiorun_run_method(run, "_reap");
    if (again == NULL) {
        return -1;
    }
    PyObject *timer = PyObject_CallMethod(run->loop, "call_later", "dO", REAP_INTERVAL,
                                          again);
    Py_DECREF(again);
    if (timer == NULL) {
        return -1;
    }
    Py_XSETREF(run->reap_timer, timer);
    return 0;
}

PyObject *
aiorun_run_reap(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    (void)unused;
    if (run->reaper == NULL || run->phase >= PHASE_DONE) {
        Py_RETURN_NONE;
    }
    if (reap_once(run) < 0) {
        aiorun_log_current_error(run->state, "Could not log a reaped orphan");
    }
    if (schedule(run) < 0) {
        return NULL;   /* the loop's exception handler reports it */
    }
    Py_RETURN_NONE;
}

/* PID 1, or a child subreaper: the processes orphans are given to. */
static int
orphans_come_here(void)
{
    int subreaper = 0;
    return getpid() == 1
        || (prctl(PR_GET_CHILD_SUBREAPER, (unsigned long)&subreaper, 0, 0, 0) == 0
            && subreaper);
}

int
aiorun_reaper_start(RunObject *run)
{
    if (!orphans_come_here()) {
        return aiorun_log(run->state, LOG_DEBUG,
                          "reap_orphans: not PID 1 nor a subreaper, so no orphans "
                          "come here; nothing to reap");
    }
    aiorun_reaper *rp = PyMem_RawCalloc(1, sizeof(*rp));
    if (rp == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    rp->self = getpid();
    run->reaper = rp;
    if (aiorun_log(run->state, LOG_INFO, "Reaping orphaned processes (PID 1).") < 0) {
        return -1;
    }
    return schedule(run);
}

void
aiorun_reaper_stop(RunObject *run)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (run->reap_timer != NULL) {
        PyObject *res = PyObject_CallMethod(run->reap_timer, "cancel", NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(run->reap_timer);
        }
        Py_XDECREF(res);
        Py_CLEAR(run->reap_timer);
    }
    if (run->reaper != NULL) {
        PyMem_RawFree(run->reaper->seen);
        PyMem_RawFree(run->reaper);
        run->reaper = NULL;
    }
    PyErr_Restore(type, value, tb);
}

#else /* not Linux */

int
aiorun_reaper_start(RunObject *run)
{
    return aiorun_log(run->state, LOG_WARNING,
                      "reap_orphans works on Linux only; nothing is reaped");
}

void
aiorun_reaper_stop(RunObject *run)
{
    (void)run;
}

PyObject *
aiorun_run_reap(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    Py_RETURN_NONE;
}

#endif
