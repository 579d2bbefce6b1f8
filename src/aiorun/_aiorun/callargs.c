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
    Py_ssize_t nargs = PyTuple_GET_SIZE(args), kwonly_given = 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    /* Keywords first, as CPython checks them (ceval's initialize_locals). */
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
        if (i < nargs && i < max_positional) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                         fname, kwlist[i]);
            return -1;
        }
        kwonly_given += i >= max_positional;
    }
    if (nargs > max_positional) {
        char sig[64], kwonly[96] = "";
        if (required == max_positional) {
            PyOS_snprintf(sig, sizeof sig, "%zd", max_positional);
        }
        else {
            PyOS_snprintf(sig, sizeof sig, "from %zd to %zd", required, max_positional);
        }
        if (kwonly_given) {
            PyOS_snprintf(kwonly, sizeof kwonly,
                          " positional argument%s (and %zd keyword-only argument%s)",
                          nargs != 1 ? "s" : "", kwonly_given, kwonly_given != 1 ? "s" : "");
        }
        PyErr_Format(PyExc_TypeError, "%s() takes %s positional argument%s but %zd%s %s "
                     "given", fname, sig, max_positional != 1 || required != max_positional
                     ? "s" : "", nargs, kwonly, nargs == 1 && !kwonly_given ? "was" : "were");
        return -1;
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
