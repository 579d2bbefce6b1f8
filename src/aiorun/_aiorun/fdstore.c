/* systemd's file descriptor store (FILE_DESCRIPTOR_STORE, sd_notify(3)):
 * store_fd() hands systemd a duplicate of an fd under a name (FDSTORE=1,
 * FDNAME=), remove_stored_fd() drops a name (FDSTOREREMOVE=1).  After a
 * restart the stored fds come back with the socket-activation ones, by
 * name (activation.c).
 *
 * systemd answers nothing: an fd it refuses is dropped with a line in its
 * own journal.  From 254 on it says in $FDSTORE how many fds the store
 * takes, so a store that is off (0) is said here.  A full one cannot be:
 * systemd drops a stored fd by itself when its other end hangs up, and
 * keeps those an earlier process of the service stored, so no count kept
 * here would be true; a delivered message is a True.  Like notify_ready(),
 * these never raise for a delivery problem: the answer is False and a
 * WARNING says why. */
#include "aiorun.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#ifndef MS_WINDOWS
#include <fcntl.h>
#endif

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

/* The fd is open: 0, or -1 with a ValueError naming the argument. */
static int
check_open(int fd)
{
#ifndef MS_WINDOWS
    if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
        PyErr_Format(PyExc_ValueError, "store_fd() argument 'fd' is %d, which is not "
                     "open", fd);
        return -1;
    }
#else
    (void)fd;
#endif
    return 0;
}

static PyObject *
store(aiorun_state *st, int fd, const char *text, int poll)
{
    const char *what = "store_fd(): FDSTORE=1 not delivered: %s";
    long long size = store_size(st);
    if (size == -1) {
        return NULL;
    }
    if (size == 0) {
        return not_delivered(st, what, PyUnicode_FromString(
            "the fd store is off (FileDescriptorStoreMax= is 0): the fd is not kept"));
    }
    char message[FDNAME_MAX + 64];
    snprintf(message, sizeof message, "FDSTORE=1\nFDNAME=%s%s", text,
             poll ? "" : "\nFDPOLL=0");
    PyObject *problem;
    int sent = aiorun_notify_oneshot(st, message, fd, NULL, &problem);
    if (sent < 0) {
        return NULL;
    }
    if (sent == 0) {
        return not_delivered(st, what, problem ? problem
                             : PyUnicode_FromString(NO_NOTIFY_SOCKET));
    }
    Py_RETURN_TRUE;
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
    Py_INCREF(name);   /* held while its text is used */
    const char *text = check_name("store_fd", name);
    PyObject *result = text != NULL && check_open(fd) == 0
        ? store(aiorun_get_state(module), fd, text, poll == Py_True) : NULL;
    Py_DECREF(name);
    return result;
}

static PyObject *
remove_stored(aiorun_state *st, const char *text)
{
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
    PyObject *result = text ? remove_stored(aiorun_get_state(module), text) : NULL;
    Py_DECREF(name);
    return result;
}
