/* Socket activation (sd_listen_fds(3)): the file descriptors systemd
 * passed this process, from its .socket units and its fd store, by name.
 *
 * systemd starts the service with the fds open from 3 on and says so in
 * three environment variables: LISTEN_PID (the process they are for),
 * LISTEN_FDS (how many) and LISTEN_FDNAMES (their names, colon-separated;
 * "unknown" for each when it is not set).  The first call of
 * listen_fds() or listen_sockets() takes them: it checks the variables
 * and every fd, marks the fds close-on-exec and removes the variables from
 * the environment, so that no child process takes them for its own (as
 * sd_listen_fds(unset_environment=1) does).  What it took is kept in the
 * module state, and every later call answers from there: the same fds, the
 * same socket objects.
 *
 * Bad variables are a ValueError naming the variable, and nothing is
 * taken; variables for another process are left to it, with a WARNING.
 * An fd that is not open is an error too: never a wrong fd. */
#include "aiorun.h"

#ifndef MS_WINDOWS

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LISTEN_FDS_START 3
/* More than any service is given, far below where fd numbers overflow. */
#define LISTEN_FDS_MAX 65536

/* A decimal number in [min, max] from the whole of text: 0, or -1. */
static int
parse_number(const char *text, long long min, long long max, long long *out)
{
    char *end;
    if (text[0] < '0' || text[0] > '9') {
        return -1;   /* strtoll would take a sign or leading blanks */
    }
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (*end != '\0' || errno != 0 || value < min || value > max) {
        return -1;
    }
    *out = value;
    return 0;
}

/* Logs message (a new reference, or NULL after an error) as a WARNING and
 * releases it: 0, or -1 with an exception. */
static int
warn(aiorun_state *st, PyObject *message)
{
    if (message == NULL) {
        return -1;
    }
    int rc = aiorun_log_exc(st, LOG_WARNING, "%s", message, NULL);
    Py_DECREF(message);
    return rc;
}

/* ValueError: environment variable NAME='value' <why>. */
static void
bad_variable(const char *name, PyObject *value, const char *why)
{
    PyObject *shown = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(value),
                                                      PyBytes_GET_SIZE(value));
    if (shown != NULL) {
        PyErr_Format(PyExc_ValueError, "environment variable %s=%R %s", name, shown, why);
        Py_DECREF(shown);
    }
}

/* The names, one per fd: LISTEN_FDNAMES split at ':', or "unknown" for
 * each.  A new list, or NULL with an exception. */
static PyObject *
fd_names(PyObject *names, long long count)
{
    PyObject *list;
    if (names == NULL) {
        list = PyList_New(0);
        for (long long i = 0; list != NULL && i < count; i++) {
            PyObject *unknown = PyUnicode_FromString("unknown");
            if (unknown == NULL || PyList_Append(list, unknown) < 0) {
                Py_CLEAR(list);
            }
            Py_XDECREF(unknown);
        }
        return list;
    }
    PyObject *text = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(names),
                                                     PyBytes_GET_SIZE(names));
    if (text == NULL) {
        return NULL;
    }
    PyObject *colon = PyUnicode_FromString(":");
    list = colon ? PyUnicode_Split(text, colon, -1) : NULL;
    Py_XDECREF(colon);
    Py_DECREF(text);
    if (list != NULL && PyList_GET_SIZE(list) != count) {
        PyErr_Format(PyExc_ValueError,
                     "environment variable LISTEN_FDNAMES has %zd names for "
                     "LISTEN_FDS=%lld fds", PyList_GET_SIZE(list), count);
        Py_CLEAR(list);
    }
    return list;
}

/* Every fd is open; then all are made close-on-exec.  0, or -1 with an
 * exception and nothing changed. */
static int
check_fds(long long count)
{
    for (long long i = 0; i < count; i++) {
        int fd = (int)(LISTEN_FDS_START + i);
        if (fcntl(fd, F_GETFD) < 0) {
            PyErr_Format(PyExc_ValueError,
                         "environment variable LISTEN_FDS=%lld names fd %d, "
                         "which is not open", count, fd);
            return -1;
        }
    }
    for (long long i = 0; i < count; i++) {
        int fd = (int)(LISTEN_FDS_START + i);
        int flags = fcntl(fd, F_GETFD);
        if (flags >= 0 && !(flags & FD_CLOEXEC)) {
            (void)fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
        }
    }
    return 0;
}

/* {name: [fd, ...]} from the variables, or {} when there are none or they
 * are another process's; NULL with an exception.  Changes nothing but the
 * fds' close-on-exec flag: the caller publishes the result, then removes
 * the variables. */
static PyObject *
take_from_environment(aiorun_state *st, int *ours)
{
    PyObject *pid = NULL, *fds = NULL, *names = NULL, *list = NULL, *result = NULL;
    long long who, count;
    *ours = 0;
    if (aiorun_getenv(st, "LISTEN_PID", &pid) < 0
        || aiorun_getenv(st, "LISTEN_FDS", &fds) < 0
        || aiorun_getenv(st, "LISTEN_FDNAMES", &names) < 0) {
        goto done;
    }
    if (pid == NULL || PyBytes_GET_SIZE(pid) == 0) {
        result = PyDict_New();   /* not socket-activated */
        goto done;
    }
    if (parse_number(PyBytes_AS_STRING(pid), 1, INT_MAX, &who) < 0) {
        bad_variable("LISTEN_PID", pid, "is not a process id");
        goto done;
    }
    if (who != (long long)getpid()) {
        /* For another process (a parent that did not unset them): not ours
         * to take, nor to remove. */
        if (warn(st, PyUnicode_FromFormat(
                "listen_fds(): environment variable LISTEN_PID=%lld names another "
                "process (this is %d): its fds are left alone", who, (int)getpid()))
            == 0) {
            result = PyDict_New();
        }
        goto done;
    }
    if (fds == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "environment variable LISTEN_PID is set but LISTEN_FDS is not");
        goto done;
    }
    if (parse_number(PyBytes_AS_STRING(fds), 0, LISTEN_FDS_MAX, &count) < 0) {
        bad_variable("LISTEN_FDS", fds, "is not a number of fds");
        goto done;
    }
    list = fd_names(names, count);
    if (list == NULL || check_fds(count) < 0) {
        goto done;
    }
    *ours = 1;
    result = PyDict_New();
    for (long long i = 0; result != NULL && i < count; i++) {
        PyObject *name = PyList_GET_ITEM(list, i);   /* the list is ours */
        PyObject *fd = PyLong_FromLongLong(LISTEN_FDS_START + i);
        PyObject *same = NULL;
        int found = fd ? PyDict_GetItemRef(result, name, &same) : -1;
        if (found == 0) {
            same = PyList_New(0);
            if (same == NULL || PyDict_SetItem(result, name, same) < 0) {
                found = -1;
            }
        }
        if (found < 0 || PyList_Append(same, fd) < 0) {
            Py_CLEAR(result);
        }
        Py_XDECREF(same);
        Py_XDECREF(fd);
    }
done:
    Py_XDECREF(pid);
    Py_XDECREF(fds);
    Py_XDECREF(names);
    Py_XDECREF(list);
    return result;
}

/* What was passed, taken on the first call: a new reference to the dict
 * kept in the state, or NULL with an exception.  The caller holds the
 * module's critical section, which a call into Python may suspend (a
 * free-threaded build) or which is no lock at all (the GIL lets another
 * thread in between bytecodes): so the first result published wins, and
 * the variables are removed only once it is, so that no caller can find
 * them gone and nothing kept. */
static PyObject *
passed_fds(aiorun_state *st)
{
    if (st->passed_fds != NULL) {
        return Py_NewRef(st->passed_fds);
    }
    int ours;
    PyObject *taken = take_from_environment(st, &ours);
    if (taken == NULL) {
        return NULL;
    }
    if (st->passed_fds == NULL) {
        st->passed_fds = taken;
    }
    else {
        Py_DECREF(taken);   /* ints only: nothing is closed */
    }
    PyObject *result = Py_NewRef(st->passed_fds);
    static const char *const variables[] = {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"};
    for (size_t i = 0; ours && i < 3; i++) {
        if (aiorun_unsetenv(st, variables[i]) < 0) {
            /* The fds are kept and given; only the children may see them. */
            aiorun_log_current_error(st, "listen_fds(): could not remove the "
                                         "LISTEN_* variables from the environment");
            break;
        }
    }
    return result;
}

/* A copy of {name: [...]}: the caller may change it, the state keeps its
 * own. */
static PyObject *
copy_by_name(PyObject *by_name)
{
    PyObject *copy = PyDict_New();
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (copy != NULL && PyDict_Next(by_name, &pos, &key, &value)) {
        PyObject *items = PySequence_List(value);
        if (items == NULL || PyDict_SetItem(copy, key, items) < 0) {
            Py_CLEAR(copy);
        }
        Py_XDECREF(items);
    }
    return copy;
}

static PyObject *
listen_fds_locked(PyObject *module)
{
    PyObject *fds = passed_fds(aiorun_get_state(module));
    PyObject *copy = fds ? copy_by_name(fds) : NULL;
    Py_XDECREF(fds);
    return copy;
}

PyObject *
aiorun_listen_fds(PyObject *module, PyObject *unused)
{
    (void)unused;
    PyObject *result;
    AIORUN_LOCKED(module, result, listen_fds_locked(module));
    return result;
}

/* socket.socket(fileno=fd), non-blocking: the family, type and protocol
 * come from the fd itself. */
static PyObject *
socket_for(PyObject *socket_type, long fd)
{
    PyObject *args = PyTuple_New(0);
    PyObject *kwargs = args ? Py_BuildValue("{s:l}", "fileno", fd) : NULL;
    PyObject *sock = kwargs ? PyObject_Call(socket_type, args, kwargs) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    if (sock != NULL) {
        PyObject *res = PyObject_CallMethod(sock, "setblocking", "O", Py_False);
        if (res == NULL) {
            /* Not closed: the fd stays systemd's, and listen_fds() has it. */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *detached = PyObject_CallMethod(sock, "detach", NULL);
            if (detached == NULL) {
                PyErr_WriteUnraisable(sock);
            }
            Py_XDECREF(detached);
            PyErr_Restore(type, value, tb);
            Py_CLEAR(sock);
        }
        Py_XDECREF(res);
    }
    return sock;
}

/* Drops sockets made here without closing their fds (a socket object
 * closes its fd when freed, and these fds are systemd's and listen_fds()'s):
 * for a result given up.  Keeps any exception set. */
static void
detach_all(PyObject *by_name)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *name, *socks;
    Py_ssize_t pos = 0;
    /* Ours alone: nothing else has seen this dict. */
    while (PyDict_Next(by_name, &pos, &name, &socks)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(socks); i++) {
            PyObject *sock = PyList_GET_ITEM(socks, i);
            PyObject *res = PyObject_CallMethod(sock, "detach", NULL);
            if (res == NULL) {
                PyErr_WriteUnraisable(sock);
            }
            Py_XDECREF(res);
        }
    }
    PyErr_Restore(type, value, tb);
}

/* {name: [socket, ...]} for the passed fds that are sockets; the others
 * are left to listen_fds(), with a WARNING that names them.  NULL with an
 * exception (nothing is kept then: the next call tries again). */
static PyObject *
make_sockets(aiorun_state *st, PyObject *fds)
{
    PyObject *module = PyImport_ImportModule("socket");
    PyObject *socket_type = module ? PyObject_GetAttrString(module, "socket") : NULL;
    Py_XDECREF(module);
    if (socket_type == NULL) {
        return NULL;
    }
    if (!PyType_Check(socket_type)) {
        PyErr_Format(PyExc_TypeError, "socket.socket is %.200s, not a type",
                     Py_TYPE(socket_type)->tp_name);
        Py_DECREF(socket_type);
        return NULL;
    }
    PyObject *result = PyDict_New();
    if (result == NULL) {
        Py_DECREF(socket_type);
        return NULL;
    }
    PyObject *name, *list;
    Py_ssize_t pos = 0;
    int failed = 0;
    /* fds is the state's own dict of lists of ints, published once and
     * never changed after. */
    while (!failed && PyDict_Next(fds, &pos, &name, &list)) {
        /* Held: the loop below calls Python code. */
        Py_INCREF(name);
        Py_INCREF(list);
        PyObject *socks = PyList_New(0);
        failed = socks == NULL || PyDict_SetItem(result, name, socks) < 0;
        for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(list); i++) {
            long fd = PyLong_AsLong(PyList_GET_ITEM(list, i));
            struct stat info;
            if (fd == -1 && PyErr_Occurred()) {
                failed = 1;
            }
            else if (fstat((int)fd, &info) < 0 || !S_ISSOCK(info.st_mode)) {
                failed = warn(st, PyUnicode_FromFormat(
                    "listen_sockets(): fd %ld (named %R) is not a socket; "
                    "listen_fds() has it", fd, name)) < 0;
            }
            else {
                PyObject *sock = socket_for(socket_type, fd);
                if (sock != NULL && PyList_Append(socks, sock) < 0) {
                    PyObject *one = PyDict_New();
                    PyObject *alone = one ? PyList_New(0) : NULL;
                    /* Not in the result: detached on its own. */
                    if (alone != NULL && PyList_Append(alone, sock) == 0
                        && PyDict_SetItem(one, name, alone) == 0) {
                        detach_all(one);
                    }
                    Py_XDECREF(alone);
                    Py_XDECREF(one);
                    failed = 1;
                }
                failed |= sock == NULL;
                Py_XDECREF(sock);
            }
        }
        Py_XDECREF(socks);
        Py_DECREF(name);
        Py_DECREF(list);
    }
    Py_DECREF(socket_type);
    if (failed) {
        /* Nothing is kept: the next call tries again, and the fds made into
         * sockets so far stay open for it. */
        detach_all(result);
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
listen_sockets_locked(PyObject *module)
{
    aiorun_state *st = aiorun_get_state(module);
    if (st->passed_sockets == NULL) {
        PyObject *fds = passed_fds(st);
        PyObject *socks = fds ? make_sockets(st, fds) : NULL;
        Py_XDECREF(fds);
        if (socks == NULL) {
            return NULL;
        }
        /* Python code ran (a logging handler, socket's import): another
         * thread's call, or this one's handler, may have made them
         * meanwhile.  The first one wins; the others' sockets let go of
         * their fds, which the winner's wrap. */
        if (st->passed_sockets == NULL) {
            st->passed_sockets = socks;
        }
        else {
            detach_all(socks);
            Py_DECREF(socks);
        }
    }
    PyObject *sockets = Py_NewRef(st->passed_sockets);
    PyObject *copy = copy_by_name(sockets);
    Py_DECREF(sockets);
    return copy;
}

PyObject *
aiorun_listen_sockets(PyObject *module, PyObject *unused)
{
    (void)unused;
    PyObject *result;
    AIORUN_LOCKED(module, result, listen_sockets_locked(module));
    return result;
}

#else /* MS_WINDOWS: no systemd */

PyObject *
aiorun_listen_fds(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyDict_New();
}

PyObject *
aiorun_listen_sockets(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyDict_New();
}

#endif
