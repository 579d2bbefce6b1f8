/* systemd's file descriptor store (FILE_DESCRIPTOR_STORE, sd_notify(3)):
 * store_fd() hands systemd a duplicate of an fd under a name (FDSTORE=1,
 * FDNAME=), remove_stored_fd() drops a name (FDSTOREREMOVE=1).  After a
 * restart the stored fds come back with the socket-activation ones, by
 * name (activation.c).
 *
 * systemd answers nothing: a store it refuses (FileDescriptorStoreMax=0,
 * or full) is dropped in silence.  From 254 on it says in $FDSTORE how many
 * fds the store takes, and that is what lets these calls say "off" or
 * "full" instead of pretending: the fds this process stored are counted
 * by identity (device and inode), since systemd too ignores an fd it holds
 * already.  Without $FDSTORE (an older systemd) they send and trust.
 * Like notify_ready(), they never raise for a delivery problem: the answer
 * is False and a WARNING says why. */
#include "aiorun.h"

#include <string.h>

#ifndef MS_WINDOWS

#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>

/* systemd's limit on a name (FDNAME_MAX), and its rule: printable ASCII,
 * no ':' (which separates LISTEN_FDNAMES). */
#define FDNAME_MAX 255

static const char *
name_problem(PyObject *name, const char **text)
{
    Py_ssize_t size;
    *text = PyUnicode_AsUTF8AndSize(name, &size);
    if (*text == NULL) {
        return NULL;
    }
    if (size == 0 || size > FDNAME_MAX) {
        return "must be 1 to 255 characters";
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)(*text)[i];
        if (c < 0x20 || c >= 0x7f || c == ':') {
            return "must be printable ASCII without ':'";
        }
    }
    return "";
}

/* The 'name' argument as text fit for FDNAME=, or NULL with an exception. */
static const char *
check_name(const char *fname, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "%s() argument 'name' must be str, not %.200s",
                     fname, Py_TYPE(name)->tp_name);
        return NULL;
    }
    const char *text;
    const char *problem = name_problem(name, &text);
    if (problem == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeError)) {
            PyErr_Clear();
            problem = "must be printable ASCII without ':'";
        }
        else {
            return NULL;
        }
    }
    if (*problem != '\0') {
        PyErr_Format(PyExc_ValueError, "%s() argument 'name' %s, not %R", fname, problem,
                     name);
        return NULL;
    }
    return text;
}

/* $FDSTORE: the store's size (>= 0); -2 when not set (systemd before 254,
 * or not systemd); -1 with an exception.  A malformed value counts as not
 * set: systemd writes it, and the send still tells. */
static long long
store_size(aiorun_state *st)
{
    PyObject *value;
    if (aiorun_getenv(st, "FDSTORE", &value) < 0) {
        return -1;
    }
    if (value == NULL) {
        return -2;
    }
    const char *text = PyBytes_AS_STRING(value);
    char *end;
    errno = 0;
    long long size = (text[0] >= '0' && text[0] <= '9') ? strtoll(text, &end, 10) : -1;
    int ok = size >= 0 && errno == 0 && *end == '\0';
    Py_DECREF(value);
    return ok ? size : -2;
}

/* (st_dev, st_ino) of fd: what tells a duplicate of it from another. */
static PyObject *
identity(int fd)
{
    struct stat info;
    if (fstat(fd, &info) < 0) {
        if (errno == EBADF) {
            PyErr_Format(PyExc_ValueError, "store_fd() argument 'fd' is %d, which is "
                         "not open", fd);
        }
        else {
            PyErr_SetFromErrno(PyExc_OSError);
        }
        return NULL;
    }
    return Py_BuildValue("(KK)", (unsigned long long)info.st_dev,
                         (unsigned long long)info.st_ino);
}

/* The state's record: 1 if id is stored under any name, 0 if not, and
 * *count the fds stored; -1 with an exception. */
static int
find_stored(aiorun_state *st, PyObject *id, Py_ssize_t *count)
{
    PyObject *name, *ids;
    Py_ssize_t pos = 0;
    int found = 0;
    *count = 0;
    /* Only tuples of ints are compared: no Python code runs here. */
    while (PyDict_Next(st->stored_fds, &pos, &name, &ids)) {
        *count += PyList_GET_SIZE(ids);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ids); i++) {
            int eq = PyObject_RichCompareBool(PyList_GET_ITEM(ids, i), id, Py_EQ);
            if (eq < 0) {
                return -1;
            }
            found |= eq;
        }
    }
    return found;
}

static int
record_stored(aiorun_state *st, PyObject *name, PyObject *id)
{
    PyObject *ids;
    int found = PyDict_GetItemRef(st->stored_fds, name, &ids);
    if (found == 0) {
        ids = PyList_New(0);
        if (ids == NULL || PyDict_SetItem(st->stored_fds, name, ids) < 0) {
            Py_XDECREF(ids);
            return -1;
        }
    }
    int rc = found < 0 ? -1 : PyList_Append(ids, id);
    Py_XDECREF(ids);
    return rc;
}

/* The answer: True, or False after a WARNING "<fname>(): <what> not
 * delivered: <problem>" (problem is a new reference, or NULL after an
 * error). */
static PyObject *
not_delivered(aiorun_state *st, const char *what, PyObject *problem)
{
    if (problem == NULL) {
        return NULL;
    }
    int rc = aiorun_log_exc(st, LOG_WARNING, what, problem, NULL);
    Py_DECREF(problem);
    return rc < 0 ? NULL : Py_NewRef(Py_False);
}

#define NO_NOTIFY_SOCKET \
    "NOTIFY_SOCKET is not set (not run by systemd as Type=notify or notify-reload)"

static PyObject *
store_fd_locked(PyObject *module, int fd, PyObject *name, const char *text, int poll)
{
    aiorun_state *st = aiorun_get_state(module);
    const char *what = "store_fd(): FDSTORE=1 not delivered: %s";
    PyObject *id = identity(fd);
    if (id == NULL) {
        return NULL;
    }
    Py_ssize_t count;
    int already = find_stored(st, id, &count);
    long long size = already < 0 ? -1 : store_size(st);
    if (size == -1) {
        Py_DECREF(id);
        return NULL;
    }
    PyObject *result = NULL;
    if (size == 0) {
        result = not_delivered(st, what, PyUnicode_FromString(
            "the fd store is off (FileDescriptorStoreMax= is 0): the fd is not kept"));
    }
    else if (!already && size > 0 && count >= size) {
        result = not_delivered(st, what, PyUnicode_FromFormat(
            "the fd store is full (FileDescriptorStoreMax=%lld, and this process "
            "stored %zd): the fd is not kept", size, count));
    }
    else {
        char message[FDNAME_MAX + 64];
        snprintf(message, sizeof message, "FDSTORE=1\nFDNAME=%s%s", text,
                 poll ? "" : "\nFDPOLL=0");
        PyObject *problem;
        int sent = aiorun_notify_oneshot(st, message, fd, NULL, &problem);
        if (sent == 1) {
            result = already || record_stored(st, name, id) == 0
                ? Py_NewRef(Py_True) : NULL;
        }
        else if (sent == 0) {
            result = not_delivered(st, what, problem ? problem
                                   : PyUnicode_FromString(NO_NOTIFY_SOCKET));
        }
    }
    Py_DECREF(id);
    return result;
}

PyObject *
aiorun_store_fd(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "name", "poll", NULL};
    PyObject *file, *name, *poll = Py_True;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:store_fd", kwlist, &file,
                                     &name, &poll)) {
        return NULL;
    }
    if (!PyBool_Check(poll)) {
        PyErr_Format(PyExc_TypeError, "store_fd() argument 'poll' must be bool, not %.200s",
                     Py_TYPE(poll)->tp_name);
        return NULL;
    }
    /* An int, or an object with fileno() (a socket, a file): the fd is
     * read now, and fileno() may run any code, so before the name is. */
    int fd = PyObject_AsFileDescriptor(file);
    if (fd < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)
            || PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *kind = PyErr_ExceptionMatches(PyExc_TypeError) ? PyExc_TypeError
                                                                     : PyExc_ValueError;
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_Format(kind, "store_fd() argument 'fd' must be an fd (an int >= 0) "
                         "or have a fileno() method: %S", value ? value : Py_None);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        return NULL;
    }
    Py_INCREF(name);   /* held across the calls below */
    const char *text = check_name("store_fd", name);
    PyObject *result = NULL;
    if (text != NULL) {
        AIORUN_LOCKED(module, result, store_fd_locked(module, fd, name, text,
                                                      poll == Py_True));
    }
    Py_DECREF(name);
    return result;
}

static PyObject *
remove_locked(PyObject *module, PyObject *name, const char *text)
{
    aiorun_state *st = aiorun_get_state(module);
    char message[FDNAME_MAX + 64];
    snprintf(message, sizeof message, "FDSTOREREMOVE=1\nFDNAME=%s", text);
    PyObject *problem;
    int sent = aiorun_notify_oneshot(st, message, -1, NULL, &problem);
    if (sent < 0) {
        return NULL;
    }
    if (sent == 0) {
        return not_delivered(st, "remove_stored_fd(): FDSTOREREMOVE=1 not delivered: %s",
                             problem ? problem : PyUnicode_FromString(NO_NOTIFY_SOCKET));
    }
    if (PyDict_DelItem(st->stored_fds, name) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            return NULL;
        }
        PyErr_Clear();   /* stored by an earlier process, or never */
    }
    Py_RETURN_TRUE;
}

PyObject *
aiorun_remove_stored_fd(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", NULL};
    PyObject *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:remove_stored_fd", kwlist, &name)) {
        return NULL;
    }
    Py_INCREF(name);
    const char *text = check_name("remove_stored_fd", name);
    PyObject *result = NULL;
    if (text != NULL) {
        AIORUN_LOCKED(module, result, remove_locked(module, name, text));
    }
    Py_DECREF(name);
    return result;
}

#else /* MS_WINDOWS: no systemd */

PyObject *
aiorun_store_fd(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    (void)args;
    (void)kwargs;
    Py_RETURN_FALSE;
}

PyObject *
aiorun_remove_stored_fd(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    (void)args;
    (void)kwargs;
    Py_RETURN_FALSE;
}

#endif
