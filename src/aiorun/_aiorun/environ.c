/* Environment variables, read through os.environ (kept from import time)
 * rather than getenv(): on a free-threaded build another thread's
 * os.environ write (putenv) may run while getenv() reads, and the C
 * library does not lock them against each other; os.environ's own dict
 * does.  Values come back encoded as the file system encoding says, the
 * bytes getenv() would have given. */
#include "aiorun.h"

int
aiorun_getenv(aiorun_state *st, const char *name, PyObject **value)
{
    *value = NULL;
    PyObject *key = PyUnicode_DecodeFSDefault(name);
    if (key == NULL) {
        return -1;
    }
    PyObject *text = PyObject_GetItem(st->environ, key);
    Py_DECREF(key);
    if (text == NULL) {
        if (PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "os.environ['%s'] is %.200s, not str", name,
                     Py_TYPE(text)->tp_name);
        Py_DECREF(text);
        return -1;
    }
    *value = PyUnicode_EncodeFSDefault(text);
    Py_DECREF(text);
    return *value == NULL ? -1 : 1;
}

int
aiorun_unsetenv(aiorun_state *st, const char *name)
{
    PyObject *key = PyUnicode_DecodeFSDefault(name);
    if (key == NULL) {
        return -1;
    }
    int rc = PyObject_DelItem(st->environ, key);
    Py_DECREF(key);
    if (rc < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
        rc = 0;
    }
    return rc;
}
