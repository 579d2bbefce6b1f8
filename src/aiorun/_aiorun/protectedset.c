/* _DO_NOT_CANCEL_COROS: the original's WeakSet of protected coroutines.
 *
 * shutdown_waits_for() marks its task (task._aiorun_protected = True)
 * instead of adding the task's coroutine to a WeakSet, which cost half of a
 * protection.  Code written against the original still looks for protected
 * work here ("the task whose coroutine is in _DO_NOT_CANCEL_COROS"), so the
 * set is a subclass of weakref.WeakSet whose membership, iteration and
 * len() also count the coroutines of the marked tasks that have not ended,
 * on the loops of every run() under way and on the running loop.  What an
 * app adds itself is held by the WeakSet as before, and protects its task.
 * The look-up walks the tasks: it is for the app, never for a hot path. */
#include "aiorun.h"

/* The loops to look at: every run()'s, and this thread's running loop. */
static PyObject *
known_loops(aiorun_state *st)
{
    PyObject *loops = PyDict_Keys(st->runs);
    PyObject *running = loops ? PyObject_CallNoArgs(st->get_running_loop) : NULL;
    if (running == NULL) {
        Py_XDECREF(loops);
        return NULL;
    }
    int known = running == Py_None ? 1 : PySequence_Contains(loops, running);
    if (known == 0 && PyList_Append(loops, running) < 0) {
        known = -1;
    }
    Py_DECREF(running);
    if (known < 0) {
        Py_CLEAR(loops);
    }
    return loops;
}

/* The coroutines of the marked tasks not ended yet, as a new list. */
static PyObject *
marked_coros(aiorun_state *st)
{
    PyObject *loops = known_loops(st);
    PyObject *coros = loops ? PyList_New(0) : NULL;
    for (Py_ssize_t i = 0; coros != NULL && i < PyList_GET_SIZE(loops); i++) {
        PyObject *tasks = aiorun_all_tasks(st, PyList_GET_ITEM(loops, i));
        for (Py_ssize_t j = 0; coros != NULL && tasks != NULL
                               && j < PyList_GET_SIZE(tasks); j++) {
            PyObject *task = PyList_GET_ITEM(tasks, j);
            int found = aiorun_task_marked(st, task);
            PyObject *coro = found > 0 ? aiorun_task_coro(st, task) : NULL;
            if (found < 0 || (coro == NULL && PyErr_Occurred())
                || (coro != NULL && coro != Py_None && PyList_Append(coros, coro) < 0)) {
                Py_CLEAR(coros);
            }
            Py_XDECREF(coro);
        }
        if (tasks == NULL) {
            Py_CLEAR(coros);
        }
        Py_XDECREF(tasks);
    }
    Py_XDECREF(loops);
    return coros;
}

/* WeakSet's own method `name` called on self. */
static PyObject *
base_call(PyObject *self, const char *name, PyObject *arg)
{
    PyObject *base = aiorun_get_state_by_type(Py_TYPE(self))->WeakSet;
    PyObject *method = PyObject_GetAttrString(base, name);
    if (method == NULL) {
        return NULL;
    }
    PyObject *res = arg ? PyObject_CallFunctionObjArgs(method, self, arg, NULL)
                        : PyObject_CallOneArg(method, self);
    Py_DECREF(method);
    return res;
}

int
aiorun_weakset_contains(aiorun_state *st, PyObject *coro)
{
    /* On the shutdown's path (every unmarked task): the method is kept. */
    PyObject *res = PyObject_CallFunctionObjArgs(st->weakset_contains, st->do_not_cancel,
                                                 coro, NULL);
    int found = res ? PyObject_IsTrue(res) : -1;
    Py_XDECREF(res);
    return found;
}

/* Everything in it: the WeakSet's entries, then the marked tasks' own. */
static PyObject *
members(PyObject *self)
{
    aiorun_state *st = aiorun_get_state_by_type(Py_TYPE(self));
    PyObject *own = base_call(self, "__iter__", NULL);
    PyObject *all = own ? PySequence_List(own) : NULL;
    Py_XDECREF(own);
    PyObject *marked = all ? marked_coros(st) : NULL;
    for (Py_ssize_t i = 0; marked != NULL && i < PyList_GET_SIZE(marked); i++) {
        PyObject *coro = PyList_GET_ITEM(marked, i);
        int dup = PySequence_Contains(all, coro);
        if (dup < 0 || (dup == 0 && PyList_Append(all, coro) < 0)) {
            Py_CLEAR(all);
        }
    }
    if (marked == NULL) {
        Py_CLEAR(all);
    }
    Py_XDECREF(marked);
    return all;
}

static int
protected_contains(PyObject *self, PyObject *item)
{
    PyObject *res = base_call(self, "__contains__", item);
    int found = res ? PyObject_IsTrue(res) : -1;
    Py_XDECREF(res);
    if (found != 0) {
        return found;
    }
    PyObject *marked = marked_coros(aiorun_get_state_by_type(Py_TYPE(self)));
    if (marked == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; !found && i < PyList_GET_SIZE(marked); i++) {
        found = PyList_GET_ITEM(marked, i) == item;   /* a WeakSet compares by identity */
    }
    Py_DECREF(marked);
    return found;
}

static PyObject *
protected_iter(PyObject *self)
{
    PyObject *all = members(self);
    PyObject *it = all ? PyObject_GetIter(all) : NULL;
    Py_XDECREF(all);
    return it;
}

static Py_ssize_t
protected_len(PyObject *self)
{
    PyObject *all = members(self);
    Py_ssize_t n = all ? PyList_GET_SIZE(all) : -1;
    Py_XDECREF(all);
    return n;
}

static PyType_Slot protected_slots[] = {
    {Py_sq_contains, protected_contains},
    {Py_sq_length, protected_len},
    {Py_tp_iter, protected_iter},
    {Py_tp_doc, "The coroutines protected from the shutdown: those added to it, and "
                "those of the tasks shutdown_waits_for() started that have not ended."},
    {0, NULL},
};

PyType_Spec aiorun_protected_set_spec = {
    .name = "aiorun._aiorun.ProtectedCoros",
    .basicsize = 0,
    /* No Py_TPFLAGS_HAVE_GC of its own: the collector's flag and traverse
     * come with WeakSet's layout (a traverse of ours would recurse through
     * the base's, which looks for the nearest different one). */
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = protected_slots,
};
