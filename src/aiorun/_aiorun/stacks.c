/* Python stacks written the way a traceback writes them:
 *
 *   File "app.py", line 12, in job
 *     time.sleep(60)
 *
 * Used by the stuck-task warning of the shutdown and by the watchdog's
 * diagnostics, so every stack aiorun prints reads the same. */
#include "aiorun.h"

#include <frameobject.h>  /* PyFrame_Check, PyFrame_GetBack before 3.11 */
#include <string.h>

/* Where a frame is: its file and function names (new references) and its
 * line.  0, or -1 with an exception set.  PyPy's C API has no frame
 * functions: there the frame's attributes say it. */
static int
frame_location(PyObject *frame, PyObject **filename, PyObject **name, int *lineno)
{
#ifndef PYPY_VERSION
    PyCodeObject *code = PyFrame_GetCode((PyFrameObject *)frame);
    *lineno = PyFrame_GetLineNumber((PyFrameObject *)frame);
    *filename = Py_NewRef(code->co_filename);
    *name = Py_NewRef(code->co_name);
    Py_DECREF(code);
    return 0;
#else
    PyObject *code = PyObject_GetAttrString(frame, "f_code");
    PyObject *line = code ? PyObject_GetAttrString(frame, "f_lineno") : NULL;
    *filename = line ? PyObject_GetAttrString(code, "co_filename") : NULL;
    *name = *filename ? PyObject_GetAttrString(code, "co_name") : NULL;
    *lineno = *name ? PyLong_AsLong(line) : -1;
    Py_XDECREF(code);
    Py_XDECREF(line);
    if (*name != NULL && (!PyUnicode_Check(*filename) || !PyUnicode_Check(*name))) {
        PyErr_SetString(PyExc_TypeError, "a frame's code names must be str");
    }
    if (*name == NULL || PyErr_Occurred()) {
        Py_CLEAR(*filename);
        Py_CLEAR(*name);
        return -1;
    }
    return 0;
#endif
}

/* 1 if obj is a frame.  Everything walked here may come from a hook an
 * app can replace (sys._current_frames(), task.get_stack()), so nothing is
 * taken for a frame unless it is one. */
static int
is_frame(PyObject *obj)
{
#ifndef PYPY_VERSION
    return PyFrame_Check(obj);
#else
    /* No PyFrame_Type here, and cpyext marks every type a heap type: the
     * type named frame that lives in builtins (an app's class of that name
     * lives in its own module). */
    if (strcmp(Py_TYPE(obj)->tp_name, "frame") != 0) {
        return 0;
    }
    PyObject *module = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), "__module__");
    int builtin = module != NULL && PyUnicode_Check(module)
        && PyUnicode_CompareWithASCIIString(module, "builtins") == 0;
    Py_XDECREF(module);
    if (module == NULL) {
        PyErr_Clear();
    }
    return builtin;
#endif
}

/* Real frames end; a chain that does not is not walked to its end. */
#define MAX_FRAMES 10000

/* The frame's caller (a new reference), or NULL, with an exception set only
 * if it could not be read. */
static PyObject *
frame_back(PyObject *frame)
{
#ifndef PYPY_VERSION
    return (PyObject *)PyFrame_GetBack((PyFrameObject *)frame);
#else
    PyObject *back = PyObject_GetAttrString(frame, "f_back");
    if (back == Py_None) {
        Py_CLEAR(back);
    }
    return back;
#endif
}

/* One frame as two traceback lines; the source line is left out when
 * linecache has none (code typed at a prompt, a deleted file). */
static int
append_frame(PyObject *parts, PyObject *getline, PyObject *frame)
{
    PyObject *filename, *name, *line = NULL, *source = NULL, *stripped = NULL;
    int lineno, rc = -1;
    if (frame_location(frame, &filename, &name, &lineno) < 0) {
        return -1;
    }
    line = PyUnicode_FromFormat("  File \"%U\", line %d, in %U\n", filename, lineno, name);
    if (line == NULL || PyList_Append(parts, line) < 0) {
        goto done;
    }
    source = PyObject_CallFunction(getline, "Oi", filename, lineno);
    if (source == NULL) {
        goto done;
    }
    stripped = PyObject_CallMethod(source, "strip", NULL);
    if (stripped == NULL) {
        goto done;
    }
    if (PyUnicode_Check(stripped) && PyUnicode_GetLength(stripped) > 0) {
        Py_SETREF(line, PyUnicode_FromFormat("    %U\n", stripped));
        if (line == NULL || PyList_Append(parts, line) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_DECREF(filename);
    Py_DECREF(name);
    Py_XDECREF(line);
    Py_XDECREF(source);
    Py_XDECREF(stripped);
    return rc;
}

PyObject *
aiorun_format_frames(PyObject *frames)
{
    PyObject *linecache = PyImport_ImportModule("linecache");
    if (linecache == NULL) {
        return NULL;
    }
    PyObject *getline = PyObject_GetAttrString(linecache, "getline");
    Py_DECREF(linecache);
    if (getline == NULL) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(frames, "a stack must be a sequence of frames");
    PyObject *parts = seq ? PyList_New(0) : NULL;
    PyObject *text = NULL;
    if (parts == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *frame = PySequence_Fast_GET_ITEM(seq, i);
        if (!is_frame(frame)) {
            PyErr_Format(PyExc_TypeError, "expected a frame, not %.200s",
                         Py_TYPE(frame)->tp_name);
            goto done;
        }
        if (append_frame(parts, getline, frame) < 0) {
            goto done;
        }
    }
    PyObject *empty = PyUnicode_FromString("");
    if (empty != NULL) {
        text = PyUnicode_Join(empty, parts);
        Py_DECREF(empty);
    }
done:
    Py_DECREF(getline);
    Py_XDECREF(seq);
    Py_XDECREF(parts);
    return text;
}

/* The frames of a coroutine and of what it awaits, outermost first:
 * cr_await (gi_yieldfrom, ag_await) leads from one to the next.  An
 * object without a frame of its own (shutdown_waits_for's awaitable) is
 * passed through; the chain ends at a future. */
static PyObject *
await_chain(PyObject *coro)
{
    static const char *const frame_attrs[] = {"cr_frame", "gi_frame", "ag_frame"};
    static const char *const next_attrs[] = {"cr_await", "gi_yieldfrom", "ag_await"};
    PyObject *frames = PyList_New(0);
    PyObject *current = Py_NewRef(coro);
    /* Bounded: a chain that loops back on itself must not hang a dump. */
    for (int depth = 0; frames != NULL && current != Py_None && depth < 1000; depth++) {
        PyObject *frame = NULL, *next = NULL;
        size_t kind;
        for (kind = 0; kind < 3; kind++) {
            if ((frame = aiorun_optional_attr(current, frame_attrs[kind])) != NULL
                || PyErr_Occurred()) {
                break;
            }
        }
        if (frame == NULL) {
            if (PyErr_Occurred()) {
                Py_CLEAR(frames);
            }
            break;   /* a future, or something else that is not a coroutine */
        }
        if (is_frame(frame) && PyList_Append(frames, frame) < 0) {
            Py_CLEAR(frames);
        }
        Py_DECREF(frame);
        next = frames ? aiorun_optional_attr(current, next_attrs[kind]) : NULL;
        if (next == NULL) {
            if (PyErr_Occurred()) {
                Py_CLEAR(frames);
            }
            break;
        }
        Py_SETREF(current, next);
    }
    Py_DECREF(current);
    return frames;
}

PyObject *
aiorun_format_task(PyObject *task)
{
    PyObject *coro = aiorun_optional_attr(task, "get_coro");
    PyObject *stack = NULL;
    if (coro != NULL) {
        Py_SETREF(coro, PyObject_CallNoArgs(coro));
        stack = coro ? await_chain(coro) : NULL;
        Py_XDECREF(coro);
    }
    else if (!PyErr_Occurred()) {
        /* A task-like object of the app's own. */
        stack = PyObject_CallMethod(task, "get_stack", NULL);
    }
    if (stack == NULL) {
        return NULL;
    }
    PyObject *frames = aiorun_format_frames(stack);
    Py_DECREF(stack);
    if (frames == NULL) {
        return NULL;
    }
    PyObject *text = PyUnicode_FromFormat("%R\n%U", task, frames);
    Py_DECREF(frames);
    return text;
}

PyObject *
aiorun_frame_chain(PyObject *frame)
{
    PyObject *chain = PyList_New(0);
    if (chain == NULL) {
        return NULL;
    }
    if (!is_frame(frame)) {
        Py_DECREF(chain);
        PyErr_Format(PyExc_TypeError, "expected a frame, not %.200s",
                     Py_TYPE(frame)->tp_name);
        return NULL;
    }
    PyObject *f = Py_NewRef(frame);
    for (int depth = 0; f != NULL; depth++) {
        if (depth == MAX_FRAMES || !is_frame(f)) {
            Py_DECREF(f);   /* a caller that is no frame, or no end */
            break;
        }
        if (PyList_Append(chain, f) < 0) {
            Py_DECREF(f);
            Py_DECREF(chain);
            return NULL;
        }
        Py_SETREF(f, frame_back(f));
    }
    if (PyErr_Occurred()) {
        Py_DECREF(chain);
        return NULL;
    }
    if (PyList_Reverse(chain) < 0) {
        Py_DECREF(chain);
        return NULL;
    }
    return chain;
}
