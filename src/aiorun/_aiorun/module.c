/* aiorun._aiorun: module definition, module state and the exported names.
 * Multi-phase init: every import of the module gets its own state. */
#include "aiorun.h"

#define AIORUN_VERSION "2025.1.1"

PyDoc_STRVAR(run_doc,
"run(coro=None, *, loop=None, shutdown_handler=None, shutdown_callback=None,\n"
"    executor_workers=None, executor=None, use_uvloop=False,\n"
"    stop_on_unhandled_errors=False, timeout_task_shutdown=60,\n"
"    shutdown_deadline=None, exit_on_repeated_signal=None,\n"
"    notify_ready_on_start=True, drain_delay=0, cancel_main_first=False,\n"
"    task_dump_signal=None, reap_orphans=None, reload_callback=None,\n"
"    deadline_covers_exit=None, health=None, liveness_timeout=None,\n"
"    shutdown_report=None)\n"
"--\n"
"\n"
"Run the event loop until SIGINT or SIGTERM (or loop.stop()), then shut\n"
"down gracefully: call shutdown_callback, cancel every task not protected\n"
"by shutdown_waits_for(), wait for them up to timeout_task_shutdown\n"
"seconds, shut the executor down and close the loop that run() created.\n"
"Returns what coro returned, or None.\n"
"\n"
"coro\n"
"    The main coroutine (or any awaitable), run as a task.  Without it\n"
"    the loop still runs.\n"
"loop\n"
"    An event loop of your own; run() leaves it open.  Not with use_uvloop.\n"
"shutdown_handler\n"
"    Called as shutdown_handler(loop) on the first SIGINT/SIGTERM; the\n"
"    default logs 'Stopping the loop' and stops the loop.\n"
"shutdown_callback\n"
"    Run after the loop stopped, before any task is cancelled: an\n"
"    awaitable, or a function of the loop (an awaitable it returns is\n"
"    awaited).\n"
"executor_workers\n"
"    max_workers of the default ThreadPoolExecutor run() makes.\n"
"executor\n"
"    An executor of your own, made the loop's default and shut down at\n"
"    the end.\n"
"use_uvloop\n"
"    Run on a new uvloop loop.\n"
"stop_on_unhandled_errors\n"
"    An unhandled error stops the loop; run() raises it after the\n"
"    shutdown.\n"
"timeout_task_shutdown\n"
"    Seconds to wait for the cancelled tasks (None: no limit).  Those\n"
"    still alive are named, with their stacks, in a WARNING.\n"
"shutdown_deadline\n"
"    Seconds the whole shutdown may take; past it the process ends with\n"
"    exit code 124 and a diagnosis.  None: AIORUN_SHUTDOWN_DEADLINE.\n"
"exit_on_repeated_signal\n"
"    True: a second SIGINT/SIGTERM ends the process at once (code 124).\n"
"    None: AIORUN_EXIT_ON_REPEATED_SIGNAL.\n"
"notify_ready_on_start\n"
"    Under systemd, send READY=1 once the main coroutine started; False\n"
"    leaves it to notify_ready().\n"
"drain_delay\n"
"    Seconds the tasks may finish by themselves before anything is\n"
"    cancelled.\n"
"cancel_main_first\n"
"    Cancel the main task first and wait for it, then the others.\n"
"task_dump_signal\n"
"    A signal (True: SIGUSR1) that logs every task and its await chain.\n"
"reap_orphans\n"
"    As PID 1, reap orphaned child processes.  None: AIORUN_REAP_ORPHANS.\n"
"deadline_covers_exit\n"
"    True: shutdown_deadline also bounds the process's exit after run()\n"
"    returns (atexit handlers, threads that are not daemons), once the\n"
"    interpreter begins to exit.  None: AIORUN_DEADLINE_COVERS_EXIT.\n"
"reload_callback\n"
"    Called with no arguments on SIGHUP, on the loop (an awaitable it\n"
"    returns is awaited), while the app goes on serving; under systemd\n"
"    RELOADING=1 and READY=1 follow it, as Type=notify-reload expects.\n"
"    If it raises, the error is logged, the app serves on, and systemd's\n"
"    reload fails at its timeout.\n"
"health\n"
"    Serve GET /readyz and GET /livez from a thread that needs no GIL, on\n"
"    'HOST:PORT', ':PORT' or a port number (127.0.0.1), or a unix socket\n"
"    path.  /readyz is 200 from READY=1's moment (or notify_ready()) until\n"
"    the shutdown's first moment, before drain_delay; /livez is 503 with\n"
"    the reason when the loop has not run for liveness_timeout seconds.\n"
"    None: AIORUN_HEALTH.\n"
"liveness_timeout\n"
"    Seconds without a loop heartbeat before /livez answers 503 (default\n"
"    10).  None: AIORUN_LIVENESS_TIMEOUT.\n"
"shutdown_report\n"
"    A path: what the shutdown did is written there as JSON (cause, phases,\n"
"    tasks, threads, outcome; the schema is shutdown_report.schema.json in\n"
"    the package), also by the watchdog on a forced exit.  Every shutdown\n"
"    ends with an INFO summary line either way.  None:\n"
"    AIORUN_SHUTDOWN_REPORT.\n"
"\n"
"SIGINT, SIGTERM, SIGHUP, the deadline, systemd, the health endpoint and\n"
"the reaper belong to the process: only the outermost run() on the main\n"
"thread takes them.");

PyDoc_STRVAR(shutdown_waits_for_doc,
"shutdown_waits_for(coro, loop=None)\n"
"--\n"
"\n"
"Start coro as a task that the shutdown phase of run() does not cancel\n"
"and return an awaitable for its result.  If the awaiting task is\n"
"cancelled it gets CancelledError at once while coro runs on; run() waits\n"
"for coro before it finishes.  Outside run() it behaves like shield().");

PyDoc_STRVAR(shutdown_handler_doc,
"_shutdown_handler(loop)\n"
"--\n"
"\n"
"The default shutdown_handler: log 'Stopping the loop' and stop the loop.");

PyDoc_STRVAR(notify_ready_doc,
"notify_ready(status=None)\n"
"--\n"
"\n"
"Tell systemd the service is ready (READY=1, and STATUS=status), for apps\n"
"run with notify_ready_on_start=False that are ready later than their\n"
"start.  True if delivered; False when NOTIFY_SOCKET is not set, or when\n"
"it could not be delivered (a WARNING on the aiorun logger says why: an\n"
"unusable address, a receiver gone, a full socket).  It never raises for\n"
"a delivery problem.  The health endpoint's /readyz turns 200 with it,\n"
"with or without systemd.");

PyDoc_STRVAR(shutdown_event_doc,
"shutdown_event(loop=None)\n"
"--\n"
"\n"
"The asyncio.Event that run() sets as its shutdown begins, before\n"
"shutdown_callback, drain_delay and any cancellation.  Call it from code\n"
"running in run()'s loop, or pass that loop; the same Event comes back\n"
"every time.");

PyDoc_STRVAR(cancelled_by_shutdown_doc,
"cancelled_by_shutdown(exc)\n"
"--\n"
"\n"
"True if exc is the CancelledError of a task that run()'s shutdown\n"
"cancelled (its message is 'aiorun shutdown: <cause>'), else False.");

PyDoc_STRVAR(listen_fds_doc,
"listen_fds()\n"
"--\n"
"\n"
"The file descriptors systemd passed this process (socket activation and\n"
"the fd store), by name: {name: [fd, ...]}, in the order systemd gave\n"
"them; {} when it passed none.  The first call takes them: it checks\n"
"LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, makes the fds close-on-exec\n"
"and removes the variables, so child processes do not take them; later\n"
"calls give the same.  Malformed variables are a ValueError; variables\n"
"for another process are left to it, with a WARNING.");

PyDoc_STRVAR(listen_sockets_doc,
"listen_sockets()\n"
"--\n"
"\n"
"The sockets among listen_fds(), by name: {name: [socket.socket, ...]},\n"
"non-blocking, of the family and type the fd has, ready for\n"
"asyncio.start_server(sock=...) or loop.create_server(sock=...).  Pass\n"
"backlog= too: asyncio listens again and would cut systemd's backlog to\n"
"100.  The same socket objects every time; fds that are not sockets are\n"
"left out, with a WARNING.");

PyDoc_STRVAR(store_fd_doc,
"store_fd(fd, name, *, poll=True)\n"
"--\n"
"\n"
"Hand systemd's fd store a duplicate of fd (an int, or an object with\n"
"fileno()) under name (FDSTORE=1, FDNAME=name); after a restart it comes\n"
"back through listen_fds() and listen_sockets() under that name.  poll=False\n"
"keeps it even when its other end hangs up (FDPOLL=0).  True if delivered;\n"
"False, with a WARNING that says why, when NOTIFY_SOCKET is not set, the\n"
"store is off (systemd's $FDSTORE is 0), or the message was not delivered.\n"
"A full store drops the fd on systemd's side, which cannot be seen from\n"
"here.  It never raises for a delivery problem.");

PyDoc_STRVAR(remove_stored_fd_doc,
"remove_stored_fd(name)\n"
"--\n"
"\n"
"Ask systemd to drop every fd its store holds under name\n"
"(FDSTOREREMOVE=1).  True if delivered; False with a WARNING if not.");

static PyMethodDef aiorun_methods[] = {
    {"listen_fds", aiorun_listen_fds, METH_NOARGS, listen_fds_doc},
    {"listen_sockets", aiorun_listen_sockets, METH_NOARGS, listen_sockets_doc},
    {"store_fd", (PyCFunction)(void (*)(void))aiorun_store_fd,
     METH_VARARGS | METH_KEYWORDS, store_fd_doc},
    {"remove_stored_fd", (PyCFunction)(void (*)(void))aiorun_remove_stored_fd,
     METH_VARARGS | METH_KEYWORDS, remove_stored_fd_doc},
    {"shutdown_event", (PyCFunction)(void (*)(void))aiorun_shutdown_event,
     METH_VARARGS | METH_KEYWORDS, shutdown_event_doc},
    {"cancelled_by_shutdown", aiorun_cancelled_by_shutdown, METH_O,
     cancelled_by_shutdown_doc},
    {"run", (PyCFunction)(void (*)(void))aiorun_run,
     METH_VARARGS | METH_KEYWORDS, run_doc},
    {"shutdown_waits_for", (PyCFunction)(void (*)(void))aiorun_shutdown_waits_for,
     METH_FASTCALL | METH_KEYWORDS, shutdown_waits_for_doc},
    {"_shutdown_handler", aiorun_default_shutdown_handler, METH_O,
     shutdown_handler_doc},
    {"notify_ready", (PyCFunction)(void (*)(void))aiorun_notify_ready,
     METH_VARARGS | METH_KEYWORDS, notify_ready_doc},
    {"_protected_orphan_done", aiorun_protected_orphan_done, METH_O,
     "_protected_orphan_done(task)\n--\n\nDone callback of a protected task whose "
     "awaiter stopped waiting: logs its exception once, as a WARNING."},
    {"_exit_began", aiorun_exit_began, METH_NOARGS,
     "_exit_began()\n--\n\nthreading's hook as the interpreter begins to exit: "
     "deadline_covers_exit's watchdog starts to count."},
    {"_after_fork_child", aiorun_after_fork_child, METH_NOARGS,
     "_after_fork_child()\n--\n\nos.register_at_fork() hook: the watchdog of a run() "
     "continued in a forked child."},
    {"_main", aiorun_cli_main, METH_O,
     "_main(argv)\n--\n\nThe command line behind python -m aiorun."},
    {NULL, NULL, 0, NULL},
};

/* Attribute `name` of the module called `module_name`, as a new reference. */
static PyObject *
import_attr(const char *module_name, const char *name)
{
    PyObject *module = PyImport_ImportModule(module_name);
    if (module == NULL) {
        return NULL;
    }
    PyObject *attr = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return attr;
}

/* typing.Optional[Union[Awaitable, Callable[[AbstractEventLoop], Awaitable],
 *                       Callable[[AbstractEventLoop], None]]] */
static PyObject *
make_shutdown_callback_alias(aiorun_state *st)
{
    PyObject *typing = NULL, *awaitable = NULL, *callable = NULL;
    PyObject *optional = NULL, *union_ = NULL, *key = NULL;
    PyObject *returns_awaitable = NULL, *returns_none = NULL;
    PyObject *members = NULL, *any_of = NULL, *alias = NULL;

    typing = PyImport_ImportModule("typing");
    if (typing == NULL) {
        goto done;
    }
    /* One at a time: no call may be made with an exception already set. */
    if ((awaitable = PyObject_GetAttrString(typing, "Awaitable")) == NULL
        || (callable = PyObject_GetAttrString(typing, "Callable")) == NULL
        || (optional = PyObject_GetAttrString(typing, "Optional")) == NULL
        || (union_ = PyObject_GetAttrString(typing, "Union")) == NULL) {
        goto done;
    }
    key = Py_BuildValue("([O]O)", st->AbstractEventLoop, awaitable);
    if (key == NULL || (returns_awaitable = PyObject_GetItem(callable, key)) == NULL) {
        goto done;
    }
    Py_SETREF(key, Py_BuildValue("([O]O)", st->AbstractEventLoop, Py_None));
    if (key == NULL || (returns_none = PyObject_GetItem(callable, key)) == NULL) {
        goto done;
    }
    members = PyTuple_Pack(3, awaitable, returns_awaitable, returns_none);
    if (members == NULL || (any_of = PyObject_GetItem(union_, members)) == NULL) {
        goto done;
    }
    alias = PyObject_GetItem(optional, any_of);
done:
    Py_XDECREF(typing);
    Py_XDECREF(awaitable);
    Py_XDECREF(callable);
    Py_XDECREF(optional);
    Py_XDECREF(union_);
    Py_XDECREF(key);
    Py_XDECREF(returns_awaitable);
    Py_XDECREF(returns_none);
    Py_XDECREF(members);
    Py_XDECREF(any_of);
    return alias;
}

static int
load_imports(aiorun_state *st)
{
    static const struct {
        size_t offset;
        const char *module;
        const char *name;
    } imports[] = {
#define IMPORT(field, module, name) {offsetof(aiorun_state, field), module, name}
        IMPORT(AbstractEventLoop, "asyncio", "AbstractEventLoop"),
        IMPORT(all_tasks, "asyncio", "all_tasks"),
        IMPORT(ensure_future, "asyncio", "ensure_future"),
        IMPORT(new_event_loop, "asyncio", "new_event_loop"),
        IMPORT(set_event_loop, "asyncio", "set_event_loop"),
        IMPORT(get_event_loop, "asyncio", "get_event_loop"),
        IMPORT(get_running_loop, "asyncio", "_get_running_loop"),
        IMPORT(set_running_loop, "asyncio", "_set_running_loop"),
        IMPORT(CancelledError, "asyncio", "CancelledError"),
        IMPORT(environ, "os", "environ"),
        IMPORT(ContextType, "contextvars", "Context"),
        IMPORT(Event, "asyncio", "Event"),
        IMPORT(Executor, "concurrent.futures", "Executor"),
        IMPORT(isawaitable, "inspect", "isawaitable"),
        IMPORT(signal_signal, "signal", "signal"),
        IMPORT(set_wakeup_fd, "signal", "set_wakeup_fd"),
        IMPORT(main_thread, "threading", "main_thread"),
        IMPORT(current_thread, "threading", "current_thread"),
        IMPORT(sig_dfl, "signal", "SIG_DFL"),
        IMPORT(partial, "functools", "partial"),
#undef IMPORT
    };
    for (size_t i = 0; i < sizeof(imports) / sizeof(imports[0]); i++) {
        PyObject *value = import_attr(imports[i].module, imports[i].name);
        if (value == NULL) {
            return -1;
        }
        *(PyObject **)((char *)st + imports[i].offset) = value;
    }
    return 0;
}

static int
intern_strings(aiorun_state *st)
{
#define INTERN(field, text)                                   \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL) { \
        return -1;                                            \
    }
    INTERN(s_add_done_callback, "add_done_callback");
    INTERN(s_remove_done_callback, "remove_done_callback");
    INTERN(s_cancel, "cancel");
    INTERN(s_cancelled, "cancelled");
    INTERN(s_done, "done");
    INTERN(s_result, "result");
    INTERN(s_exception, "exception");
    INTERN(s_create_future, "create_future");
    INTERN(s_get_context, "get_context");
    INTERN(s_context, "_context");
    INTERN(s_set_result, "set_result");
    INTERN(s_get_coro, "get_coro");
    INTERN(s_coro, "_coro");
    INTERN(s_loop, "loop");
    INTERN(s_call_soon_threadsafe, "call_soon_threadsafe");
    INTERN(s_run_until_complete, "run_until_complete");
    INTERN(s_call_soon, "call_soon");
    INTERN(s_create_task, "create_task");
    INTERN(s_add, "add");
    INTERN(s_protected, "_aiorun_protected");
#undef INTERN
    if ((st->kw_context = Py_BuildValue("(s)", "context")) == NULL) {
        return -1;
    }
    return 0;
}

static int
aiorun_exec(PyObject *module)
{
    aiorun_state *st = aiorun_get_state(module);
    PyObject *all = NULL, *alias = NULL;
    int rc = -1;

    if (load_imports(st) < 0 || intern_strings(st) < 0) {
        return -1;
    }
    /* C raises and matches it: an app that replaced asyncio.CancelledError
     * before importing aiorun must have put an exception class there. */
    if (!PyExceptionClass_Check(st->CancelledError)) {
        PyErr_Format(PyExc_TypeError, "asyncio.CancelledError is %.200s, not an "
                     "exception class", Py_TYPE(st->CancelledError)->tp_name);
        return -1;
    }
    PyObject *main = PyObject_CallNoArgs(st->main_thread);
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    Py_XDECREF(main);
    st->main_thread_ident = ident ? PyLong_AsUnsignedLong(ident) : 0;
    Py_XDECREF(ident);
    if (PyErr_Occurred()) {
        return -1;
    }
    st->fork_hook_registered = 0;
    st->owner = NULL;
    /* service_stopping: zeroed with the state, as an atomic may be. */
    st->gc_paused = 0;
    st->exit_guard = NULL;
    st->exit_hook_registered = 0;
    /* passed_fds and passed_sockets stay NULL until the first call takes
     * what systemd passed (activation.c). */
    /* Kept here, not looked up by name when needed: a waiter may be
     * finalized while the interpreter is clearing module dicts. */
    st->orphan_done = PyObject_GetAttrString(module, "_protected_orphan_done");
    if (st->orphan_done == NULL) {
        return -1;
    }
    st->RunType = PyType_FromModuleAndSpec(module, &aiorun_run_type_spec, NULL);
    if (st->RunType == NULL) {
        return -1;
    }
    st->WaiterType = PyType_FromModuleAndSpec(module, &aiorun_waiter_type_spec, NULL);
    if (st->WaiterType == NULL) {
        return -1;
    }
    st->WaitFutureType = PyType_FromModuleAndSpec(module, &aiorun_waitfuture_type_spec,
                                                  NULL);
    if (st->WaitFutureType == NULL) {
        return -1;
    }
    /* A tuple: 3.9 takes no single base here. */
    PyObject *str_base = PyTuple_Pack(1, (PyObject *)&PyUnicode_Type);
    if (str_base == NULL) {
        return -1;
    }
    st->ShutdownMessageType = PyType_FromModuleAndSpec(module, &aiorun_message_type_spec,
                                                       str_base);
    Py_DECREF(str_base);
    if (st->ShutdownMessageType == NULL || (st->runs = PyDict_New()) == NULL) {
        return -1;
    }

    PyObject *get_logger = import_attr("logging", "getLogger");
    if (get_logger == NULL) {
        return -1;
    }
    st->logger = PyObject_CallFunction(get_logger, "s", "aiorun");
    Py_DECREF(get_logger);
    if (st->logger == NULL) {
        return -1;
    }
    st->protected_var = PyContextVar_New("aiorun_protected_work", NULL);
    if (st->protected_var == NULL) {
        return -1;
    }
    /* Only the C Task's context is read through its traverse (shield.c). */
    st->CTask = import_attr("_asyncio", "Task");
    if (st->CTask == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ImportError)
            && !PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -1;
        }
        PyErr_Clear();
        st->CTask = Py_NewRef(Py_None);
    }
    st->WeakSet = import_attr("weakref", "WeakSet");
    st->weakset_contains = st->WeakSet ? PyObject_GetAttrString(st->WeakSet, "__contains__")
                                       : NULL;
    PyObject *bases = st->weakset_contains ? PyTuple_Pack(1, st->WeakSet) : NULL;
    PyObject *set_type = bases ? PyType_FromModuleAndSpec(module, &aiorun_protected_set_spec,
                                                          bases) : NULL;
    Py_XDECREF(bases);
    st->do_not_cancel = set_type ? PyObject_CallNoArgs(set_type) : NULL;
    Py_XDECREF(set_type);
    if (st->do_not_cancel == NULL) {
        return -1;
    }

    if ((alias = make_shutdown_callback_alias(st)) == NULL
        || (all = Py_BuildValue("[ss]", "run", "shutdown_waits_for")) == NULL
        || PyModule_AddStringConstant(module, "__version__", AIORUN_VERSION) < 0
        || PyModule_AddObjectRef(module, "__all__", all) < 0
        || PyModule_AddObjectRef(module, "ShutdownCallback", alias) < 0
        || PyModule_AddObjectRef(module, "logger", st->logger) < 0
        || PyModule_AddObjectRef(module, "_DO_NOT_CANCEL_COROS", st->do_not_cancel) < 0
        || PyModule_AddObjectRef(module, "ShutdownWaiter", st->WaiterType) < 0
        || PyModule_AddIntConstant(module, "FORCED_EXIT_CODE", AIORUN_FORCED_EXIT_CODE) < 0
#ifdef MS_WINDOWS
        || PyModule_AddObjectRef(module, "WINDOWS", Py_True) < 0
#else
        || PyModule_AddObjectRef(module, "WINDOWS", Py_False) < 0
#endif
        ) {
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(alias);
    Py_XDECREF(all);
    return rc;
}

static int
aiorun_traverse(PyObject *module, visitproc visit, void *arg)
{
    aiorun_state *st = aiorun_get_state(module);
#define AIORUN_VISIT(name) Py_VISIT(st->name);
    AIORUN_STATE_OBJECTS(AIORUN_VISIT)
#undef AIORUN_VISIT
    return 0;
}

static int
aiorun_clear(PyObject *module)
{
    aiorun_state *st = aiorun_get_state(module);
#define AIORUN_CLEAR(name) Py_CLEAR(st->name);
    AIORUN_STATE_OBJECTS(AIORUN_CLEAR)
#undef AIORUN_CLEAR
    return 0;
}

static void
aiorun_free(void *module)
{
    (void)aiorun_clear((PyObject *)module);
}

static PyModuleDef_Slot aiorun_slots[] = {
    {Py_mod_exec, aiorun_exec},
#if PY_VERSION_HEX >= 0x030D0000 && !defined(PYPY_VERSION)
    /* Safe without the GIL (aiorun.h says how): importing aiorun leaves a
     * free-threaded build free-threaded. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef aiorun_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiorun._aiorun",
    .m_doc = "The C implementation of aiorun: run() and shutdown_waits_for().",
    .m_size = sizeof(aiorun_state),
    .m_methods = aiorun_methods,
    .m_slots = aiorun_slots,
    .m_traverse = aiorun_traverse,
    .m_clear = aiorun_clear,
    .m_free = aiorun_free,
};

PyMODINIT_FUNC
PyInit__aiorun(void)
{
    return PyModuleDef_Init(&aiorun_module);
}
