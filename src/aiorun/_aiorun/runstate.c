/* The Run object: the state of one call of run().  Its bound methods are
 * the callables run() hands to the signal module and to the event loop
 * (signal handler, exception handler, done callbacks), so they all reach
 * the same state without any global. */
#include "aiorun.h"

#include <string.h>

RunObject *
aiorun_run_new(aiorun_state *st)
{
    PyTypeObject *type = (PyTypeObject *)st->RunType;
    RunObject *run = PyObject_GC_New(RunObject, type);
    if (run == NULL) {
        return NULL;
    }
    run->state = st;
    run->loop = NULL;
    run->thread = aiorun_thread_ident();
    run->shutdown_handler = NULL;
    run->pending_exc = NULL;
    run->main_task = NULL;
    run->saved_handlers = NULL;
    run->reload_callback = NULL;
    run->reload_task = NULL;
    run->reloading = 0;
    run->reload_scheduled = 0;
    run->reload_again = 0;
    run->reload_usec = 0;
    run->drain_waiter = NULL;
    run->drain_remaining = 0;
    run->drain_over = 0;
    run->phase = PHASE_SETUP;
    run->own_loop = 0;
    run->handler_installed = 0;
    run->shutdown_requested = 0;
    run->owns_process = 0;
    run->handler_scheduled = 0;
    run->wake_fds[0] = run->wake_fds[1] = -1;
    run->watchdog = NULL;
    run->notifier = NULL;
    run->ping_timer = NULL;
    run->cause = CAUSE_NONE;
    run->cause_signum = 0;
    run->cancel_msg = NULL;
    run->shutdown_event = NULL;
    run->shutdown_began = 0;
    run->drain_delay = 0;
    run->task_timeout = -1;
    run->main_first = 0;
    run->dump_signum = 0;
    run->reaper = NULL;
    run->reap_timer = NULL;
    run->health = NULL;
    run->health_timer = NULL;
    memset(&run->report, 0, sizeof run->report);
    PyObject_GC_Track(run);
    return run;
}

PyObject *
aiorun_run_method(RunObject *run, const char *name)
{
    return PyObject_GetAttrString((PyObject *)run, name);
}

/* asyncio.all_tasks() (3.9-3.13) copies one WeakSet that the loops of all
 * threads add their tasks to, and gives up with RuntimeError ("Set changed
 * size during iteration") after 1000 tries.  Busy threads on a
 * free-threaded build make that happen (seen under ThreadSanitizer, 16
 * threads): the shutdown must still find its tasks, so it asks again. */
#define ALL_TASKS_ATTEMPTS 20

PyObject *
aiorun_all_tasks(aiorun_state *st, PyObject *loop)
{
    PyObject *task_set = NULL;
    for (int attempt = 1; task_set == NULL; attempt++) {
        task_set = PyObject_CallOneArg(st->all_tasks, loop);
        if (task_set == NULL && (attempt == ALL_TASKS_ATTEMPTS
                                 || !PyErr_ExceptionMatches(PyExc_RuntimeError))) {
            return NULL;
        }
        if (task_set == NULL) {
            PyErr_Clear();
        }
    }
    PyObject *tasks = PySequence_List(task_set);
    Py_DECREF(task_set);
    return tasks;
}

PyObject *
aiorun_run_tasks(RunObject *run)
{
    return aiorun_all_tasks(run->state, run->loop);
}

void
aiorun_run_stage(RunObject *run, int stage)
{
    aiorun_watchdog_stage(run, (aiorun_stage)stage);
    aiorun_notify_stage(run, (aiorun_stage)stage);
    aiorun_report_stage(run, stage);
    aiorun_health_stage(run, stage);
}

static int
run_traverse(RunObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->loop);
    Py_VISIT(self->shutdown_handler);
    Py_VISIT(self->pending_exc);
    Py_VISIT(self->main_task);
    Py_VISIT(self->saved_handlers);
    Py_VISIT(self->drain_waiter);
    Py_VISIT(self->ping_timer);
    Py_VISIT(self->cancel_msg);
    Py_VISIT(self->shutdown_event);
    Py_VISIT(self->reap_timer);
    Py_VISIT(self->health_timer);
    Py_VISIT(self->reload_callback);
    Py_VISIT(self->reload_task);
    return 0;
}

int
aiorun_run_clear(RunObject *self)
{
    /* shutdown_event() may be reading these two on another thread. */
    PyObject *loop, *event;
    Py_BEGIN_CRITICAL_SECTION(self);
    loop = self->loop;
    event = self->shutdown_event;
    self->loop = self->shutdown_event = NULL;
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(loop);
    Py_XDECREF(event);
    Py_CLEAR(self->shutdown_handler);
    Py_CLEAR(self->pending_exc);
    Py_CLEAR(self->main_task);
    Py_CLEAR(self->saved_handlers);
    Py_CLEAR(self->drain_waiter);
    Py_CLEAR(self->ping_timer);
    Py_CLEAR(self->cancel_msg);
    Py_CLEAR(self->reap_timer);
    Py_CLEAR(self->health_timer);
    Py_CLEAR(self->reload_callback);
    Py_CLEAR(self->reload_task);
    return 0;
}

static void
run_dealloc(RunObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)aiorun_run_clear(self);
    PyObject_GC_Del(self);
    Py_DECREF(type);
}

static PyObject *
run_repr(RunObject *self)
{
    static const char *phases[] = {"setup", "running", "shutdown", "done"};
    return PyUnicode_FromFormat("<aiorun run state phase=%s>", phases[self->phase]);
}

static PyMethodDef run_methods[] = {
    {"_on_signal", (PyCFunction)(void (*)(void))aiorun_run_on_signal,
     METH_FASTCALL, "Signal handler installed while run() is active."},
    {"_call_shutdown_handler", aiorun_run_call_shutdown_handler, METH_NOARGS,
     "Calls shutdown_handler(loop) on the loop's thread, while it runs."},
    {"_exception_handler", (PyCFunction)(void (*)(void))aiorun_run_exception_handler,
     METH_FASTCALL, "Loop exception handler for stop_on_unhandled_errors."},
    {"_main_done", aiorun_run_main_done, METH_O,
     "Done callback of the main task: reports its exception at once."},
    {"_drain_wakeups", aiorun_run_drain_wakeups, METH_NOARGS,
     "Reader of the signal wake-up pipe: empties it."},
    {"_task_done", (PyCFunction)(void (*)(void))aiorun_run_task_done, METH_FASTCALL,
     "Done callback of a task the shutdown waits for."},
    {"_drain_timeout", (PyCFunction)(void (*)(void))aiorun_run_drain_timeout,
     METH_FASTCALL,
     "Ends the wait for cancelled tasks when timeout_task_shutdown passes."},
    {"_notify_ready", aiorun_run_notify_ready, METH_NOARGS,
     "Sends READY=1 once the main coroutine has started."},
    {"_notify_watchdog", aiorun_run_notify_watchdog, METH_NOARGS,
     "Sends WATCHDOG=1 and schedules the next ping on the loop."},
    {"_on_dump_signal", (PyCFunction)(void (*)(void))aiorun_run_on_dump_signal,
     METH_FASTCALL, "Handler of task_dump_signal: has the loop dump its tasks."},
    {"_dump_tasks", aiorun_run_dump_tasks, METH_NOARGS,
     "Logs every task of the loop with its await chain."},
    {"_on_reload_signal", (PyCFunction)(void (*)(void))aiorun_run_on_reload_signal,
     METH_FASTCALL, "SIGHUP handler when run() has a reload_callback."},
    {"_reload", aiorun_run_reload, METH_NOARGS,
     "Starts a reload on the loop: RELOADING=1, then reload_callback()."},
    {"_reload_done", aiorun_run_reload_done, METH_O,
     "Done callback of an async reload: READY=1, or the failure logged."},
    {"_health_beat", aiorun_run_health_beat, METH_NOARGS,
     "The loop's heartbeat for the health endpoint's /livez."},
    {"_reap", aiorun_run_reap, METH_NOARGS,
     "Reaps orphaned children that stayed zombies since the last call."},
#ifdef MS_WINDOWS
    {"_windows_wakeup", aiorun_run_windows_wakeup, METH_NOARGS,
     "Wakes the loop periodically so Ctrl-C is noticed on Windows."},
#endif
    {NULL, NULL, 0, NULL},
};

static PyType_Slot run_slots[] = {
    {Py_tp_new, aiorun_refuse_new},
    {Py_tp_dealloc, run_dealloc},
    {Py_tp_traverse, run_traverse},
    {Py_tp_clear, aiorun_run_clear},
    {Py_tp_repr, run_repr},
    {Py_tp_methods, run_methods},
    {0, NULL},
};

PyType_Spec aiorun_run_type_spec = {
    .name = "aiorun._aiorun.RunState",
    .basicsize = sizeof(RunObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = run_slots,
};
