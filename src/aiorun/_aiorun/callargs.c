/* Argument errors worded the way Python words them for a def, so that a
 * user's tests (and habits) see what the original, a Python function,
 * said: "run() takes from 0 to 1 positional arguments but 2 were given",
 * "run() got an unexpected keyword argument 'foo'".  The parsing itself is
 * PyArg_ParseTupleAndKeywords' afterwards; this only checks the shape. */
#include "aiorun.h"

/* The index of `key` in kwlist, or -1. */
static Py_ssize_t
keyword_index(char *const *kwlist, PyObject *key)
{
    for (Py_ssize_t i = 0; kwlist[i] != NULL; i++) {
        if (PyUnicode_CompareWithASCIIString(key, kwlist[i]) == 0) {
            return i;
        }
    }
    return -1;
}

int
aiorun_check_call(const char *fname, PyObject *args, PyObject *kwargs,
                  char *const *kwlist, Py_ssize_t max_positional, Py_ssize_t required)
{
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs > max_positional) {
        if (required == max_positional) {
            PyErr_Format(PyExc_TypeError, "%s() takes %zd positional argument%s but %zd %s "
                         "given", fname, max_positional, max_positional == 1 ? "" : "s",
                         nargs, nargs == 1 ? "was" : "were");
        }
        else {
            PyErr_Format(PyExc_TypeError, "%s() takes from %zd to %zd positional "
                         "arguments but %zd were given", fname, required, max_positional,
                         nargs);
        }
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (kwargs != NULL && PyDict_Next(kwargs, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "%s() keywords must be strings", fname);
            return -1;
        }
        Py_ssize_t i = keyword_index(kwlist, key);
        if (i < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         fname, key);
            return -1;
        }
        if (i < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         fname, kwlist[i]);
            return -1;
        }
    }
    for (Py_ssize_t i = nargs; i < required; i++) {
        int given = 0;
        pos = 0;
        while (kwargs != NULL && PyDict_Next(kwargs, &pos, &key, &value)) {
            given |= keyword_index(kwlist, key) == i;
        }
        if (!given) {
            PyErr_Format(PyExc_TypeError, "%s() missing 1 required positional argument: "
                         "'%s'", fname, kwlist[i]);
            return -1;
        }
    }
    return 0;
}
