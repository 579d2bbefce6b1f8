/* The task dump: every task of the loop with what it is waiting on.
 *
 * On demand, run(task_dump_signal=...) logs it when that signal comes,
 * while the app runs on; the shutdown uses the same description for the
 * tasks that refuse to exit.  A task is described by its repr (which
 * names the future it waits on), then its await chain written like a
 * traceback: on 3.14+ the frames of asyncio.capture_call_graph() and the
 * futures awaiting the task, before that the frames of each coroutine
 * awaiting the next (stacks.c).  One layout on every version, and the
 * same as the watchdog's.
 *
 * The signal handler itself only asks the loop, through
 * call_soon_threadsafe(), to dump the tasks: a dump taken between two
 * bytecodes of some task's step would see that task half-way. */
#include "aiorun.h"

/* asyncio.capture_call_graph, or NULL (no exception) before 3.14. */
static PyObject *
call_graph_capturer(void)
{
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL) {
        return NULL;
    }
    PyObject *capture = aiorun_optional_attr(asyncio, "capture_call_graph");
    Py_DECREF(asyncio);
    return capture;
}

/* "  awaited by <repr>\n" for each future of graph.awaited_by. */
static int
append_awaited_by(PyObject *parts, PyObject *graph)
{
    PyObject *awaiters = PyObject_GetAttrString(graph, "awaited_by");
    PyObject *seq = awaiters ? PySequence_Fast(awaiters, "awaited_by") : NULL;
    Py_XDECREF(awaiters);
    if (seq == NULL) {
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *future = PyObject_GetAttrString(PySequence_Fast_GET_ITEM(seq, i),
                                                  "future");
        PyObject *line = future ? PyUnicode_FromFormat("  awaited by %R\n", future) : NULL;
        rc = line ? PyList_Append(parts, line) : -1;
        Py_XDECREF(future);
        Py_XDECREF(line);
    }
    Py_DECREF(seq);
    return rc;
}

/* 3.14+: the task's repr, the frames of asyncio.capture_call_graph(task)
 * (outermost first, as a traceback), then the futures awaiting it. */
static PyObject *
describe_by_call_graph(PyObject *capture, PyObject *task)
{
    PyObject *graph = NULL, *stack = NULL, *frames = NULL, *text = NULL;
    PyObject *parts = NULL, *head = NULL, *empty = NULL;
    graph = PyObject_CallOneArg(capture, task);
    if (graph == NULL) {
        return NULL;
    }
    if (graph == Py_None) {   /* not a future after all */
        Py_DECREF(graph);
        return aiorun_format_task(task);
    }
    stack = PyObject_GetAttrString(graph, "call_stack");
    PyObject *entries = stack ? PySequence_List(stack) : NULL;
    Py_XSETREF(stack, entries);
    if (stack == NULL || PyList_Reverse(stack) < 0 || (frames = PyList_New(0)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(stack); i++) {
        PyObject *frame = PyObject_GetAttrString(PyList_GET_ITEM(stack, i), "frame");
        int rc = frame ? PyList_Append(frames, frame) : -1;
        Py_XDECREF(frame);
        if (rc < 0) {
            goto done;
        }
    }
    if ((parts = PyList_New(0)) == NULL
        || (head = PyUnicode_FromFormat("%R\n", task)) == NULL
        || PyList_Append(parts, head) < 0) {
        goto done;
    }
    Py_SETREF(head, aiorun_format_frames(frames));
    if (head == NULL || PyList_Append(parts, head) < 0 || append_awaited_by(parts, graph) < 0
        || (empty = PyUnicode_FromString("")) == NULL) {
        goto done;
    }
    text = PyUnicode_Join(empty, parts);
done:
    Py_DECREF(graph);
    Py_XDECREF(stack);
    Py_XDECREF(frames);
    Py_XDECREF(parts);
    Py_XDECREF(head);
    Py_XDECREF(empty);
    return text;
}

PyObject *
aiorun_describe_task(PyObject *task)
{
    PyObject *capture = call_graph_capturer();
    if (capture != NULL) {
        PyObject *text = describe_by_call_graph(capture, task);
        Py_DECREF(capture);
        return text;
    }
    /* The repr names the future the task waits on (wait_for=...). */
    return PyErr_Occurred() ? NULL : aiorun_format_task(task);
}

/* signal.Signals(signum).name, or "signal N". */
static PyObject *
signal_name(int signum)
{
    PyObject *signal = PyImport_ImportModule("signal");
    PyObject *member = signal ? PyObject_CallMethod(signal, "Signals", "i", signum) : NULL;
    PyObject *name = member ? PyObject_GetAttrString(member, "name") : NULL;
    Py_XDECREF(signal);
    Py_XDECREF(member);
    if (name != NULL && !PyUnicode_Check(name)) {
        Py_CLEAR(name);   /* a signal module an app replaced */
    }
    if (name == NULL) {
        PyErr_Clear();
        name = PyUnicode_FromFormat("signal %d", signum);
    }
    return name;
}

/* Every task of `tasks` described, one after the other. */
static PyObject *
dump_tasks(PyObject *tasks)
{
    PyObject *parts = PyList_New(0), *text = NULL, *separator = NULL;
    if (parts == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
        PyObject *described = aiorun_describe_task(PyList_GET_ITEM(tasks, i));
        int rc = described ? PyList_Append(parts, described) : -1;
        Py_XDECREF(described);
        if (rc < 0) {
            goto done;
        }
    }
    separator = PyUnicode_FromString("\n");
    text = separator ? PyUnicode_Join(separator, parts) : NULL;
done:
    Py_DECREF(parts);
    Py_XDECREF(separator);
    return text;
}

/* The loop's tasks, the main task first. */
static PyObject *
tasks_main_first(RunObject *run)
{
    PyObject *tasks = aiorun_run_tasks(run);
    if (tasks == NULL || run->main_task == NULL) {
        return tasks;
    }
    for (Py_ssize_t i = 1; i < PyList_GET_SIZE(tasks); i++) {
        if (PyList_GET_ITEM(tasks, i) == run->main_task) {
            PyObject *first = PyList_GET_ITEM(tasks, 0);
            PyList_SET_ITEM(tasks, 0, PyList_GET_ITEM(tasks, i));
            PyList_SET_ITEM(tasks, i, first);
            break;
        }
    }
    return tasks;
}

PyObject *
aiorun_run_dump_tasks(PyObject *self, PyObject *unused)
{
    RunObject *run = (RunObject *)self;
    PyObject *tasks = NULL, *name = NULL, *body = NULL, *text = NULL;
    (void)unused;
    if (run->loop == NULL || run->phase >= PHASE_DONE) {
        Py_RETURN_NONE;
    }
    if ((tasks = tasks_main_first(run)) == NULL
        || (name = signal_name(run->dump_signum)) == NULL
        || (body = dump_tasks(tasks)) == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(tasks);
    text = PyUnicode_FromFormat("Task dump (%U): %zd task%s%s%U", name, n,
                                n == 1 ? "" : "s", n > 0 ? "\n" : "", body);
    if (text != NULL && aiorun_log_exc(run->state, LOG_WARNING, "%s", text, NULL) < 0) {
        Py_CLEAR(text);
    }
done:
    Py_XDECREF(tasks);
    Py_XDECREF(name);
    Py_XDECREF(body);
    if (text == NULL) {
        /* A dump must never disturb the app: say why there is none. */
        aiorun_log_current_error(run->state, "Could not dump the tasks");
        Py_RETURN_NONE;
    }
    Py_DECREF(text);
    Py_RETURN_NONE;
}

PyObject *
aiorun_run_on_dump_signal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RunObject *run = (RunObject *)self;
    (void)args;
    (void)nargs;
    if (run->loop == NULL || run->phase >= PHASE_DONE) {
        Py_RETURN_NONE;
    }
    /* Our own reference: the calls below may run other signal handlers. */
    PyObject *loop = Py_NewRef(run->loop);
    int closed = aiorun_loop_says(loop, "is_closed");
    PyObject *dump = closed == 0 ? aiorun_run_method(run, "_dump_tasks") : NULL;
    PyObject *res = dump ? PyObject_CallMethodOneArg(
        loop, run->state->s_call_soon_threadsafe, dump) : NULL;
    Py_XDECREF(dump);
    Py_DECREF(loop);
    if (closed == 1) {
        /* The shutdown has closed the loop: there are no tasks to dump. */
        Py_RETURN_NONE;
    }
    if (res == NULL) {
        /* Raising here would surface at a random place in the app. */
        aiorun_log_current_error(run->state, "Could not schedule the task dump");
        Py_RETURN_NONE;
    }
    Py_DECREF(res);
    Py_RETURN_NONE;
}

int
aiorun_taskdump_install(RunObject *run)
{
    if (run->dump_signum == 0) {
        return 0;
    }
    PyObject *handler = aiorun_run_method(run, "_on_dump_signal");
    if (handler == NULL) {
        return -1;
    }
    PyObject *previous = PyObject_CallFunction(run->state->signal_signal, "iO",
                                               run->dump_signum, handler);
    Py_DECREF(handler);
    if (previous == NULL) {
        /* A number the platform will not let us catch (glibc keeps 32 and
         * 33 for itself): say which parameter asked for it. */
        if (PyErr_ExceptionMatches(PyExc_OSError)
            || PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyErr_Format(PyExc_ValueError,
                         "run() argument 'task_dump_signal': signal %d cannot be "
                         "handled here (%S)", run->dump_signum, value);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        return -1;
    }
    /* Given back with SIGINT's and SIGTERM's when run() returns. */
    PyObject *entry = Py_BuildValue("(iN)", run->dump_signum, previous);
    int rc = entry ? PyList_Append(run->saved_handlers, entry) : -1;
    Py_XDECREF(entry);
    return rc;
}
