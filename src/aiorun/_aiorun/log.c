/* Calls into the "aiorun" logger.  The messages are part of the interface
 * (users alert on them), so they are passed through verbatim. */
#include "aiorun.h"

int
aiorun_log(aiorun_state *st, int level, const char *message)
{
    /* No arguments: logging does not %-format the message. */
    PyObject *res = PyObject_CallMethod(st->logger, "log", "is", level, message);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

int
aiorun_log_exc(aiorun_state *st, int level, const char *fmt, PyObject *arg,
               PyObject *exc)
{
    PyObject *method = NULL, *args = NULL, *kwargs = NULL, *res = NULL;
    int rc = -1;

    method = PyObject_GetAttrString(st->logger, "log");
    if (method == NULL) {
        goto done;
    }
    args = arg ? Py_BuildValue("(isO)", level, fmt, arg)
               : Py_BuildValue("(is)", level, fmt);
    if (args == NULL) {
        goto done;
    }
    kwargs = Py_BuildValue("{sO}", "exc_info", exc ? exc : Py_None);
    if (kwargs == NULL) {
        goto done;
    }
    res = PyObject_Call(method, args, kwargs);
    if (res == NULL) {
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(method);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_XDECREF(res);
    return rc;
}

int
aiorun_log_enabled(aiorun_state *st, int level)
{
    PyObject *res = PyObject_CallMethod(st->logger, "isEnabledFor", "i", level);
    if (res == NULL) {
        return -1;
    }
    int enabled = PyObject_IsTrue(res);
    Py_DECREF(res);
    return enabled;
}

void
aiorun_log_current_error(aiorun_state *st, const char *message)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    if (aiorun_log_exc(st, LOG_ERROR, message, NULL, value) < 0) {
        /* Even logging failed: leave a trace on stderr, never raise. */
        PyErr_WriteUnraisable(NULL);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}
