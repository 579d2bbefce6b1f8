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

/* PyGC_Disable()/PyGC_Enable() came in 3.10: the gc module's functions do
 * the same.  Both return whether the collector was enabled before; on an
 * error (the gc module unavailable) they leave it as it is. */
static inline int
aiorun_gc_call(const char *name)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *gc = PyImport_ImportModule("gc");
    PyObject *was = gc ? PyObject_CallMethod(gc, "isenabled", NULL) : NULL;
    PyObject *res = was ? PyObject_CallMethod(gc, name, NULL) : NULL;
    int enabled = res ? PyObject_IsTrue(was) : 0;
    Py_XDECREF(gc);
    Py_XDECREF(was);
    Py_XDECREF(res);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(NULL);
    }
    PyErr_Restore(type, value, tb);
    return enabled > 0;
}
#define PyGC_Disable() aiorun_gc_call("disable")
#define PyGC_Enable() aiorun_gc_call("enable")

/* 3.9 has no immutable-type flag; the types are still not subclassable. */
#define Py_TPFLAGS_IMMUTABLETYPE 0
#endif

#if PY_VERSION_HEX < 0x030D0000 && !defined(PYPY_VERSION)
/* 3.13's name for what 3.9-3.12 had as _PyObject_LookupAttr: 1 and a new
 * reference, 0 and NULL if there is no such attribute (no exception set),
 * -1 on any other error. */
#define PyObject_GetOptionalAttr _PyObject_LookupAttr
#endif

#ifdef PYPY_VERSION
/* PyPy's C API has neither; the same through getattr(). */
static inline int
PyObject_GetOptionalAttr(PyObject *obj, PyObject *name, PyObject **result)
{
    *result = PyObject_GetAttr(obj, name);
    if (*result != NULL) {
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}
#endif

/* A flag written by one thread and read by any (notify_ready() runs on any
 * thread, also on free-threaded builds). */
#ifndef MS_WINDOWS
#include <stdatomic.h>
typedef atomic_int aiorun_flag;
#define aiorun_flag_set(flag) atomic_store((flag), 1)
#define aiorun_flag_get(flag) atomic_load((flag))
#else
typedef volatile long aiorun_flag;   /* systemd does not exist there */
#define aiorun_flag_set(flag) (*(flag) = 1)
#define aiorun_flag_get(flag) (*(flag))
#endif

/* Context variables: PyPy's C API has no PyContextVar_Reset() and no
 * PyContext_CheckExact(); the same through the objects themselves. */
#ifdef PYPY_VERSION
static inline int
aiorun_contextvar_reset(PyObject *var, PyObject *token)
{
    PyObject *res = PyObject_CallMethod(var, "reset", "O", token);
    Py_XDECREF(res);
    return res ? 0 : -1;
}
#else
#define aiorun_contextvar_reset PyContextVar_Reset
#endif

/* Critical sections (3.13): on a free-threaded build they lock an object;
 * with the GIL, and on older Pythons, they are plain braces. */
#ifndef Py_BEGIN_CRITICAL_SECTION
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

#if PY_VERSION_HEX < 0x030D0000
/* 3.13's PyDict_GetItemRef: 1 and a new reference, 0 and NULL if the key
 * is missing (no exception), -1 on error.  A borrowed item of a shared
 * dict is not safe once another thread may delete it. */
static inline int
PyDict_GetItemRef(PyObject *dict, PyObject *key, PyObject **result)
{
    PyObject *item = PyDict_GetItemWithError(dict, key);
    *result = Py_XNewRef(item);
    return item != NULL ? 1 : PyErr_Occurred() ? -1 : 0;
}
#endif

/* sys.<name> as a new reference, or NULL with an exception set.  Never
 * through builtins.__import__, which an app can replace (this runs on the
 * watchdog's thread too).  With the GIL, PySys_GetObject()'s borrowed
 * reference is held before any other code can run; without it, another
 * thread could replace and free it meanwhile, so the attribute is read
 * from the module in sys.modules (a stand-in there is checked for type by
 * every caller, as any replaced attribute is). */
static inline PyObject *
aiorun_sys_attr(const char *name)
{
#ifdef Py_GIL_DISABLED
    PyObject *key = PyUnicode_FromString("sys");
    PyObject *sys = key ? PyImport_GetModule(key) : NULL;
    Py_XDECREF(key);
    if (sys == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "sys is not in sys.modules");
        }
        return NULL;
    }
    PyObject *value = PyObject_GetAttrString(sys, name);
    Py_DECREF(sys);
    return value;
#else
    PyObject *value = Py_XNewRef(PySys_GetObject(name));
    if (value == NULL && !PyErr_Occurred()) {
        PyErr_Format(PyExc_AttributeError, "module 'sys' has no attribute '%s'", name);
    }
    return value;
#endif
}

/* 1 in the main interpreter.  PyPy has no other. */
static inline int
aiorun_in_main_interpreter(void)
{
#ifdef PYPY_VERSION
    return 1;
#else
    return PyInterpreterState_Get() == PyInterpreterState_Main();
#endif
}

/* The running thread's identifier; PyPy's PyThread_get_thread_ident()
 * returns a long, CPython's an unsigned long. */
static inline unsigned long
aiorun_thread_ident(void)
{
    return (unsigned long)PyThread_get_thread_ident();
}

/* Has the interpreter begun finalizing?  Read without the GIL, from the
 * watchdog's thread (CPython keeps it in an atomic). */
static inline int
aiorun_is_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000 && !defined(PYPY_VERSION)
    return Py_IsFinalizing();
#elif !defined(PYPY_VERSION)
    return _Py_IsFinalizing();
#else
    return 0;
#endif
}

#endif /* AIORUN_COMPAT_H */
