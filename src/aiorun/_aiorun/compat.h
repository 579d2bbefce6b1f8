/* Backports of the C API pieces we use that older supported Pythons lack.
 * Everything version-dependent lives here, guarded by PY_VERSION_HEX. */
#ifndef AIORUN_COMPAT_H
#define AIORUN_COMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>  /* offsetof */

#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *
Py_NewRef(PyObject *obj)
{
    Py_INCREF(obj);
    return obj;
}

static inline PyObject *
Py_XNewRef(PyObject *obj)
{
    Py_XINCREF(obj);
    return obj;
}

static inline int
PyModule_AddObjectRef(PyObject *module, const char *name, PyObject *value)
{
    if (value == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_SystemError, "PyModule_AddObjectRef() got NULL");
        }
        return -1;
    }
    Py_INCREF(value);
    if (PyModule_AddObject(module, name, value) < 0) {
        Py_DECREF(value);
        return -1;
    }
    return 0;
}

/* 3.9 has no immutable-type flag; the types are still not subclassable. */
#define Py_TPFLAGS_IMMUTABLETYPE 0
#endif

#endif /* AIORUN_COMPAT_H */
