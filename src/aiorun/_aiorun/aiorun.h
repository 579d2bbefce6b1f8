/* Internal declarations shared by the C files of aiorun._aiorun.
 *
 * Who owns what:
 *   module.c    module definition, state, exported names
 *   run.c       run(): argument checks, set-up, running the loop
 *   runstate.c  the per-call Run object that carries run()'s state
 *   signals.c   taking over SIGINT/SIGTERM and giving them back
 *   sigcatch.c  holding them back while the handlers are swapped
 *   unhandled.c stop_on_unhandled_errors: the exception handler, main-task watch
 *   shutdown.c  the shutdown phase after the loop stops
 *   shield.c    shutdown_waits_for() and the awaitable it returns
 *   protectedset.c  _DO_NOT_CANCEL_COROS, the original's set, as a view
 *   waitfuture.c  what a task awaiting shutdown_waits_for() waits on
 *   watchdog.c  the thread that bounds the shutdown: deadline, forced exit
 *   sigwake.c   the C-level signal handler that wakes the watchdog
 *   notify.c    systemd notifications: ready, stopping, phases, pings
 *   health.c    the health endpoint: /readyz and /livez from a C thread
 *   report.c    the shutdown report: the summary line, the JSON file
 *   cli.c       python -m aiorun: options, target, run()
 *   stacks.c    Python stacks formatted the way tracebacks show them
 *   reasons.c   how the app learns of the shutdown: shutdown_event(), the
 *               cancel message naming the cause, cancelled_by_shutdown()
 *   taskdump.c  the task dump: on a signal, and for tasks that refuse to exit
 *   reaper.c    reaping orphaned children as PID 1
 *   log.c       calls into the "aiorun" logger
 *   callargs.c  argument errors worded as Python's own
 *   idset.c     a set of objects by identity (the shutdown's seen tasks)
 *   environ.c   environment variables, through os.environ
 */
#ifndef AIORUN_H
#define AIORUN_H

#include "compat.h"

#include <signal.h>

/* Who owns what.
 *
 * The process.  Some effects of run() belong to the whole process, not to
 * one loop: SIGINT/SIGTERM and the task dump signal, the watchdog (the
 * shutdown deadline and the forced exit), systemd's notifications and its
 * WATCHDOG=1 keep-alive, the garbage collector's pause during the drain,
 * and reaping orphans as PID 1.  One run() at a time holds them: the one
 * on the main thread of the main interpreter that began when no other
 * run() held them (the outermost: a run() nested in another's plain
 * shutdown_callback does not).  It is aiorun_state.owner from its start to
 * its return; a later run() in sequence becomes the owner in turn.  Every
 * other run() (on a helper thread, in a subinterpreter, nested) drives its
 * own loop and leaves all of them alone; asking one for the deadline, the
 * dump signal or reaping is a ValueError, and the environment variables
 * that turn them on do not apply to it.
 *
 * The service.  The owner speaks for it to systemd: STATUS= as it goes,
 * READY=1 once, STOPPING=1 only when the process was asked to stop (a
 * signal, or Ctrl-C's KeyboardInterrupt): a run() that ends because its
 * loop stopped or an error stopped it may be followed by another run(),
 * and its process exits by itself when not.  Nothing says READY=1 after
 * STOPPING=1.
 *
 * The error.  The exception run() raises is the one that stopped the loop:
 * until the loop has stopped, the latest report that carries an exception
 * (the exception handler of stop_on_unhandled_errors), or a BaseException
 * escaping the loop when nothing was reported; a report without an
 * exception erases nothing.  From the moment the loop has stopped, a
 * report or error is logged and kept only if nothing is kept yet; a
 * SystemExit kept keeps its code. */

/* Module state.  Every object field is listed once here; the struct,
 * m_traverse and m_clear are all generated from this list. */
#define AIORUN_STATE_OBJECTS(X)                                             \
    X(RunType)                  /* type of the per-call Run object */       \
    X(WaiterType)               /* type returned by shutdown_waits_for */   \
    X(WaitFutureType)           /* what its awaiting task waits on */       \
    X(ShutdownMessageType)      /* str subclass: the shutdown's cancel msg */\
    X(runs)                     /* {loop: Run} for the runs under way */    \
    X(Event)                    /* asyncio.Event */                         \
    X(logger)                   /* logging.getLogger("aiorun") */           \
    X(do_not_cancel)            /* _DO_NOT_CANCEL_COROS (protectedset.c) */ \
    X(WeakSet)                  /* weakref.WeakSet, its base */             \
    X(weakset_contains)         /* WeakSet.__contains__ */                  \
    X(protected_var)            /* ContextVar set in protected work (shield.c) */\
    X(CTask)                    /* _asyncio.Task, or None without it */      \
    X(environ)                  /* os.environ, as it was at import */       \
    X(ContextType)              /* contextvars.Context */                   \
    X(AbstractEventLoop)                                                    \
    X(Executor)                 /* concurrent.futures.Executor */           \
    X(all_tasks)                /* asyncio.all_tasks */                     \
    X(ensure_future)                                                        \
    X(new_event_loop)                                                       \
    X(set_event_loop)                                                       \
    X(get_event_loop)                                                       \
    X(get_running_loop)         /* asyncio._get_running_loop */             \
    X(set_running_loop)         /* asyncio._set_running_loop */             \
    X(CancelledError)           /* asyncio.CancelledError */                \
    X(isawaitable)              /* inspect.isawaitable */                   \
    X(signal_signal)            /* signal.signal */                         \
    X(set_wakeup_fd)            /* signal.set_wakeup_fd */                  \
    X(main_thread)              /* threading.main_thread */                 \
    X(current_thread)           /* threading.current_thread */              \
    X(sig_dfl)                                                              \
    X(partial)                  /* functools.partial */                     \
    X(orphan_done)              /* _protected_orphan_done of this module */ \
    /* interned method and attribute names used on hot paths */             \
    X(s_add_done_callback)                                                  \
    X(s_remove_done_callback)                                               \
    X(s_cancel)                                                             \
    X(s_cancelled)                                                          \
    X(s_done)                                                               \
    X(s_result)                                                             \
    X(s_exception)                                                          \
    X(s_create_future)                                                      \
    X(s_set_result)                                                         \
    X(s_get_coro)                                                           \
    X(s_coro)                   /* "_coro", for task-likes w/o get_coro */  \
    X(s_get_context)                                                        \
    X(s_context)                /* "_context", a Python Task's context */   \
    X(s_loop)                   /* "loop" keyword */                        \
    X(s_call_soon_threadsafe)                                               \
    X(s_call_soon)                                                          \
    X(s_create_task)                                                        \
    X(s_add)                                                                \
    X(s_protected)              /* "_aiorun_protected": the task's mark */  \
    X(kw_context)               /* ("context",): vectorcall keyword names */\
    X(s_run_until_complete)                                                 \
    /* Written once, under the module's critical section (activation.c): */\
    X(passed_fds)               /* {name: [fd]} systemd passed, once taken */\
    X(passed_sockets)           /* the same fds as socket objects */

typedef struct {
#define AIORUN_FIELD(name) PyObject *name;
    AIORUN_STATE_OBJECTS(AIORUN_FIELD)
#undef AIORUN_FIELD
    /* The run() that holds the process's effects, or NULL (the ownership
     * rule above).  Borrowed: that run() clears it before it returns.  Read
     * and written on the main thread only. */
    struct RunObject *owner;
    aiorun_flag service_stopping; /* STOPPING=1 was sent: no READY=1 after it */
    aiorun_flag service_ready;  /* READY=1 was sent: a reload may say it again */
    int gc_paused;              /* the owner's drain turned the collector off */
    /* threading.main_thread().ident at import: run() must know, before it
     * calls any Python code, whether it is there. */
    unsigned long main_thread_ident;
    int fork_hook_registered;   /* os.register_at_fork() done (watchdog.c) */
    /* The watchdog a run() with deadline_covers_exit left to bound the
     * process's exit (watchdog.c), or NULL; main thread only. */
    struct aiorun_watchdog *exit_guard;
    int exit_hook_registered;   /* threading._register_atexit() done */
#ifndef MS_WINDOWS
    /* notify_ready() calls, from any thread: the health endpoint's /readyz
     * turns ready when the count moves (health.c). */
    atomic_uint ready_calls;
#endif
} aiorun_state;

static inline aiorun_state *
aiorun_get_state(PyObject *module)
{
    return (aiorun_state *)PyModule_GetState(module);
}

/* For methods of our own heap types: the type knows its module. */
static inline aiorun_state *
aiorun_get_state_by_type(PyTypeObject *type)
{
    return (aiorun_state *)PyType_GetModuleState(type);
}

/* tp_new of the types that only run() and shutdown_waits_for() create (with
 * PyObject_GC_New): one made from Python would have no state behind it.  A
 * slot, not tp_new = NULL after the fact, which PyPy's types do not see. */
static inline PyObject *
aiorun_refuse_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    (void)args;
    (void)kwargs;
    PyErr_Format(PyExc_TypeError, "cannot create '%s' instances", type->tp_name);
    return NULL;
}

/* obj.name() as a truth value: 1, 0, or -1 with an exception set.  For
 * done(), cancelled() and the like on futures and tasks. */
static inline int
aiorun_call_predicate(PyObject *obj, PyObject *name)
{
    PyObject *res = PyObject_CallMethodNoArgs(obj, name);
    if (res == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(res);
    Py_DECREF(res);
    return truth;
}

/* 1 if obj is a contextvars.Context (PyPy has no PyContext_CheckExact). */
static inline int
aiorun_is_context(aiorun_state *st, PyObject *obj)
{
#ifdef PYPY_VERSION
    return Py_IS_TYPE(obj, (PyTypeObject *)st->ContextType);
#else
    (void)st;
    return PyContext_CheckExact(obj);
#endif
}

/* loop.<method>() (is_closed, is_running) as a truth value: 1, 0, or -1
 * with an exception set.  A loop subclass may answer 0 or any object: its
 * truth is what counts, never its identity with False. */
static inline int
aiorun_loop_says(PyObject *loop, const char *method)
{
    PyObject *res = PyObject_CallMethod(loop, method, NULL);
    if (res == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(res);
    Py_DECREF(res);
    return truth;
}

/* getattr(obj, name), or NULL with no exception set when obj has no such
 * attribute (NULL with an exception for any other error). */
static inline PyObject *
aiorun_optional_attr(PyObject *obj, const char *name)
{
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return value;
}

/* The current exception as a normalized instance that carries its
 * traceback, cleared; NULL if none is set. */
static inline PyObject *
aiorun_take_error(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* Sets exc (consumed) as the current exception, with its traceback. */
static inline void
aiorun_restore_error(PyObject *exc)
{
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
}

/* Free-threaded builds.  Without the GIL, two threads may call into one of
 * our objects at once.
 * - A Run belongs to the thread of its run(), as its loop does: its
 *   callbacks run there.  Other threads reach it in two ways only:
 *   shutdown_event(loop=...), which reads and sets shutdown_event and
 *   shutdown_began under the Run's critical section (as the loop's thread
 *   writes them, and clears loop, reasons.c and runstate.c), and the
 *   watchdog's helper, which keeps a loop of its own under its own mutex.
 *   run() itself holds no section: the loop's callbacks would each
 *   re-enter it, which 3.13 makes slow (a spin, then a park).
 * - A ShutdownWaiter and a ShutdownWaitFuture can be handed to any thread:
 *   every way in holds a critical section on the object, the GIL's rule
 *   per object.  Like the GIL, the section is let go while its thread
 *   blocks, which a call into Python may do, and the code already looks at
 *   its fields again after each such call.
 * - The module state is set at import and only read afterwards, except
 *   what systemd passed (activation.c): published once, the first result
 *   winning, under a critical section on the module; the `runs` dict hands
 *   out new references (PyDict_GetItemRef).
 * With the GIL the sections compile to nothing. */
#define AIORUN_LOCKED(obj, result, call)  \
    do {                                  \
        Py_BEGIN_CRITICAL_SECTION(obj);   \
        (result) = (call);                \
        Py_END_CRITICAL_SECTION();        \
    } while (0)

/* Wrappers that call impl under a critical section on self, for the
 * method tables; impl may take self as its own object type. */
#define AIORUN_LOCKED_NOARGS(name, impl)                                  \
    static PyObject *name(PyObject *self, PyObject *unused)              \
    {                                                                     \
        PyObject *res;                                                    \
        AIORUN_LOCKED(self, res, impl((void *)self, unused));             \
        return res;                                                       \
    }
#define AIORUN_LOCKED_O(name, impl) AIORUN_LOCKED_NOARGS(name, impl)

/* Logging levels of the logging module. */
enum { LOG_DEBUG = 10, LOG_INFO = 20, LOG_WARNING = 30, LOG_ERROR = 40 };

/* ---- log.c ---- */
int aiorun_log(aiorun_state *st, int level, const char *message);
/* logger.log(level, fmt, arg, exc_info=exc); exc may be NULL or None. */
int aiorun_log_exc(aiorun_state *st, int level, const char *fmt, PyObject *arg,
                   PyObject *exc);
/* 1 if the logger would emit at level, 0 if not, -1 on error. */
int aiorun_log_enabled(aiorun_state *st, int level);
/* Log the exception currently set (and clear it); for callbacks that must
 * never raise into their caller. */
void aiorun_log_current_error(aiorun_state *st, const char *message);

/* ---- runstate.c: the Run object ---- */
typedef enum {
    PHASE_SETUP,     /* run() is preparing the loop */
    PHASE_RUNNING,   /* loop.run_forever() is under way */
    PHASE_SHUTDOWN,  /* the loop has stopped; shutting down */
    PHASE_DONE       /* run() is returning */
} run_phase;

/* Exit code of a shutdown cut short by the watchdog (deadline passed, or a
 * repeated signal when asked for): 124, as timeout(1) uses. */
#define AIORUN_FORCED_EXIT_CODE 124

typedef struct aiorun_watchdog aiorun_watchdog;
typedef struct aiorun_notifier aiorun_notifier;
typedef struct aiorun_reaper aiorun_reaper;
typedef struct aiorun_probe aiorun_probe;

/* Why the shutdown began (reasons.c). */
typedef enum {
    CAUSE_NONE,
    CAUSE_SIGNAL,
    CAUSE_LOOP_STOPPED,
    CAUSE_UNHANDLED_ERROR,
    CAUSE_KEYBOARD_INTERRUPT
} aiorun_cause;

/* A counter another thread may read (the watchdog's, on a forced exit). */
#ifndef MS_WINDOWS
typedef atomic_long aiorun_counter;
#define aiorun_counter_get(c) atomic_load(c)
#define aiorun_counter_set(c, v) atomic_store((c), (v))
#define aiorun_counter_add(c, v) atomic_fetch_add((c), (v))
#else
typedef volatile long aiorun_counter;
#define aiorun_counter_get(c) (*(c))
#define aiorun_counter_set(c, v) (*(c) = (v))
#define aiorun_counter_add(c, v) (*(c) += (v))
#endif

#define AIORUN_REPORT_PHASES 32
#define AIORUN_REPORT_REFUSED_MAX (256 * 1024)

/* What the shutdown did, for its summary and report (report.c).  Written
 * on the loop's thread only; what the watchdog's thread reads on a forced
 * exit is published by the counters. */
typedef struct {
    char *path;                /* shutdown_report, fs-encoded, or NULL */
    double requested_at;       /* CLOCK_MONOTONIC at the first request, 0 */
    double requested_wall;     /* the same moment in Unix time */
    aiorun_counter n_phases;
    struct { int stage; double at; } phases[AIORUN_REPORT_PHASES];
    aiorun_counter cancelled;  /* cancel() called */
    aiorun_counter drained;    /* finished by themselves during drain_delay */
    aiorun_counter refused;    /* still alive at timeout_task_shutdown */
    aiorun_counter protected_seen;
    aiorun_counter protected_abandoned;
    char *refused_json;        /* their descriptions, JSON objects, append-only */
    aiorun_counter refused_len;
    int refused_cut;           /* some did not fit */
} aiorun_report;

typedef struct RunObject {
    PyObject_HEAD
    aiorun_state *state;       /* borrowed: the type keeps the module alive */

    /* This run()'s loop and what it does with it. */
    PyObject *loop;
    unsigned long thread;      /* the thread of this run(), its loop's */
    PyObject *shutdown_handler;
    PyObject *pending_exc;     /* exception to re-raise at the end, or NULL */
    PyObject *main_task;       /* strong reference to the task of `coro` */
    PyObject *drain_waiter;    /* future set once the drain is over */
    Py_ssize_t drain_remaining;
    int drain_over;            /* the drain's wait has been ended */
    run_phase phase;
    int own_loop;              /* run() created the loop, so it closes it */
    int handler_installed;     /* our exception handler is on the loop */
    int shutdown_requested;    /* a signal came, or the shutdown began */
    int handler_scheduled;     /* shutdown_handler has been handed to the loop */
    aiorun_cause cause;        /* why the shutdown began: the first request */
    int cause_signum;          /* the signal, for CAUSE_SIGNAL */
    PyObject *cancel_msg;      /* "aiorun shutdown: ...", made as it begins */
    PyObject *shutdown_event;  /* asyncio.Event from shutdown_event(), or NULL */
    int shutdown_began;        /* the event is (to be) set */
    double drain_delay;        /* seconds the tasks get before any cancel */
    double task_timeout;       /* timeout_task_shutdown as run() checked it
                                * (-1: None); never read from the object
                                * again, whose __float__ may answer anew */
    int main_first;            /* cancel the main task first, then the rest */

    /* The process's effects (the ownership rule above): set up only when
     * owns_process, so every other run() leaves these NULL, -1 or 0. */
    int owns_process;          /* this run() is aiorun_state.owner */
    PyObject *saved_handlers;  /* list of (signum, handler before run()) */
    int wake_fds[2];           /* pipe the signal module writes to, or -1s */
    int dump_signum;           /* the signal that dumps the tasks, or 0 */
    aiorun_watchdog *watchdog; /* NULL unless a deadline or forced exit is on */
    aiorun_notifier *notifier; /* NULL unless NOTIFY_SOCKET is set */
    PyObject *ping_timer;      /* the loop's handle of the next WATCHDOG=1 */
    aiorun_reaper *reaper;     /* NULL unless reaping orphans as PID 1 */
    PyObject *reap_timer;      /* the loop's handle of the next reaping */
    PyObject *reload_callback; /* reload_callback, or NULL (reload.c) */
    PyObject *reload_task;     /* the task of an async reload under way */
    int reloading;             /* a reload has begun and not ended */
    int reload_scheduled;      /* _reload is on the loop's ready queue */
    int reload_again;          /* a SIGHUP came meanwhile: one more after it */
    unsigned long long reload_usec; /* CLOCK_MONOTONIC at the reload's start */
    aiorun_probe *health;      /* the health endpoint, or NULL (health.c) */
    PyObject *health_timer;    /* the loop's handle of the next heartbeat */
    aiorun_report report;      /* the shutdown's figures (report.c) */
} RunObject;

extern PyType_Spec aiorun_run_type_spec;
RunObject *aiorun_run_new(aiorun_state *st);
/* Drop every reference the Run object holds (also its tp_clear). */
int aiorun_run_clear(RunObject *run);
/* Bound method `name` of run: a callable to hand to asyncio or signal. */
PyObject *aiorun_run_method(RunObject *run, const char *name);
/* asyncio.all_tasks(loop) as a new list (asked again when another thread's
 * loop makes asyncio give up, see runstate.c). */
PyObject *aiorun_all_tasks(aiorun_state *st, PyObject *loop);
/* The same for run->loop. */
PyObject *aiorun_run_tasks(RunObject *run);
/* run has reached `stage`: tells the watchdog and the supervisor. */
void aiorun_run_stage(RunObject *run, int stage);

/* ---- run.c ---- */
PyObject *aiorun_run(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *aiorun_default_shutdown_handler(PyObject *module, PyObject *loop);

/* ---- sigcatch.c: SIGINT/SIGTERM held back while handlers are swapped ---- */
typedef struct {
    int holding;
#ifndef MS_WINDOWS
    sigset_t previous;          /* this thread's mask before the hold */
    struct sigaction saved[2];  /* dispositions the catcher replaced */
    int catching;               /* bit i: the catcher is on signal i */
#endif
} aiorun_held_signals;
/* Blocks both in this thread; with catch_others (only the main thread of
 * the main interpreter), a catcher notes one that another thread takes. */
void aiorun_signals_hold(aiorun_held_signals *held, int catch_others);
/* Idempotent: ends the hold if it is on.  A noted signal is raised again
 * for the handler now in place, or dropped with drop_caught. */
void aiorun_signals_release(aiorun_held_signals *held, int drop_caught);

/* ---- signals.c ---- */
int aiorun_signals_take_over(RunObject *run);
/* Called once run->loop is set: hands over a signal that came early. */
void aiorun_signals_loop_ready(RunObject *run);
/* While the loop runs: a signal taken by any thread wakes it (see
 * signals.c); both idempotent, 0 or -1 with an exception. */
int aiorun_signals_wake_loop(RunObject *run);
void aiorun_signals_unwake_loop(RunObject *run);
PyObject *aiorun_run_drain_wakeups(PyObject *self, PyObject *unused);
/* Puts the previous handlers back; keeps any exception already set. */
void aiorun_signals_restore(RunObject *run);
PyObject *aiorun_run_on_signal(PyObject *self, PyObject *const *args,
                               Py_ssize_t nargs);
PyObject *aiorun_run_call_shutdown_handler(PyObject *self, PyObject *unused);
#ifdef MS_WINDOWS
PyObject *aiorun_run_windows_wakeup(PyObject *self, PyObject *unused);
#endif

/* ---- reload.c ---- */
PyObject *aiorun_run_on_reload_signal(PyObject *self, PyObject *const *args,
                                      Py_ssize_t nargs);
PyObject *aiorun_run_reload(PyObject *self, PyObject *unused);
PyObject *aiorun_run_reload_done(PyObject *self, PyObject *task);
/* Called once run->loop is set: starts a reload a SIGHUP asked for early. */
void aiorun_reload_loop_ready(RunObject *run);

/* ---- unhandled.c ---- */
PyObject *aiorun_run_exception_handler(PyObject *self, PyObject *const *args,
                                       Py_ssize_t nargs);
PyObject *aiorun_run_main_done(PyObject *self, PyObject *task);

/* ---- shutdown.c ---- */
/* The exception `exc` (a new reference, consumed; NULL: none) came from
 * `what`: the first one is kept to be re-raised at the end of run(), a
 * later one is logged with `message` (a format taking `what` as %s).
 * Never raises. */
void aiorun_keep_exception(RunObject *run, PyObject *exc, const char *message,
                           const char *what);
/* aiorun_keep_exception() of the error that is set. */
void aiorun_keep_error(RunObject *run, const char *what);
/* The whole shutdown phase; returns None or raises the pending exception. */
PyObject *aiorun_shutdown(RunObject *run, PyObject *shutdown_callback,
                          PyObject *executor, PyObject *timeout);
/* Callbacks of one wait of the shutdown, given (waiter, ...) by a partial. */
PyObject *aiorun_run_task_done(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *aiorun_run_drain_timeout(PyObject *self, PyObject *const *args,
                                   Py_ssize_t nargs);

/* ---- reasons.c ---- */
extern PyType_Spec aiorun_message_type_spec;
/* A shutdown was requested; the first request names the cause.  Also
 * tells the watchdog. */
void aiorun_run_request(RunObject *run, aiorun_cause cause, int signum);
/* "aiorun shutdown: <cause>" as a ShutdownMessage. */
PyObject *aiorun_shutdown_message(RunObject *run);
PyObject *aiorun_cancelled_by_shutdown(PyObject *module, PyObject *exc);
/* shutdown_event(loop=None): the asyncio.Event of the run() driving the
 * loop (by default the running one). */
PyObject *aiorun_shutdown_event(PyObject *module, PyObject *args, PyObject *kwargs);
/* Sets the event if someone asked for it; later askers get it set. */
int aiorun_run_begin_shutdown(RunObject *run);

/* ---- taskdump.c ---- */
/* One task and its await chain: asyncio.format_call_graph() on 3.14+,
 * else its repr and stack. */
PyObject *aiorun_describe_task(PyObject *task);
/* Installs the dump signal's handler (run->dump_signum); 0 or -1. */
int aiorun_taskdump_install(RunObject *run);
PyObject *aiorun_run_on_dump_signal(PyObject *self, PyObject *const *args,
                                    Py_ssize_t nargs);
PyObject *aiorun_run_dump_tasks(PyObject *self, PyObject *unused);

/* ---- reaper.c ---- */
/* Starts reaping orphans when this process is PID 1 (or a subreaper);
 * logs and does nothing otherwise.  0 or -1 with an exception. */
int aiorun_reaper_start(RunObject *run);
/* Cancels the timer and frees the reaper; keeps any exception set. */
void aiorun_reaper_stop(RunObject *run);
PyObject *aiorun_run_reap(PyObject *self, PyObject *unused);

/* ---- idset.c ---- */
typedef struct {
    PyObject **slots;   /* NULL until the first add */
    size_t mask;        /* number of slots - 1 */
    size_t used;
} aiorun_idset;
#define AIORUN_IDSET_INIT {NULL, 0, 0}
/* 1 if obj was added (and is now held), 0 if it was there, -1 (MemoryError). */
int aiorun_idset_add(aiorun_idset *set, PyObject *obj);
/* Empties the set and drops its references, which may run any code. */
void aiorun_idset_clear(aiorun_idset *set);

/* ---- shield.c ---- */
extern PyType_Spec aiorun_waiter_type_spec;
PyObject *aiorun_shutdown_waits_for(PyObject *module, PyObject *const *args,
                                    Py_ssize_t nargs, PyObject *kwnames);
/* Done callback of a protected task whose awaiter stopped waiting: logs
 * its exception once, as a WARNING. */
PyObject *aiorun_protected_orphan_done(PyObject *module, PyObject *task);
/* 1 if task is protected by shutdown_waits_for, 0 if not, -1 on error. */
int aiorun_is_protected(aiorun_state *st, PyObject *task);
/* 1 if task carries the mark shutdown_waits_for() gives its own task
 * (_aiorun_protected is True itself), 0 if not, -1 on error. */
int aiorun_task_marked(aiorun_state *st, PyObject *task);
/* The coroutine behind a task: task.get_coro(), else task._coro, else NULL
 * (with no exception) for future-likes that have neither. */
PyObject *aiorun_task_coro(aiorun_state *st, PyObject *task);

/* ---- protectedset.c ---- */
extern PyType_Spec aiorun_protected_set_spec;
/* coro is in _DO_NOT_CANCEL_COROS's own WeakSet (what the app added, or a
 * task that could not be marked): 1, 0, or -1. */
int aiorun_weakset_contains(aiorun_state *st, PyObject *coro);

/* ---- waitfuture.c ---- */
extern PyType_Spec aiorun_waitfuture_type_spec;
/* A new wait on task, ready to be yielded (_asyncio_future_blocking set). */
PyObject *aiorun_waitfuture_new(aiorun_state *st, PyObject *task, PyObject *loop);
/* Ready it to be yielded again: 1, or 0 if it was cancelled and is spent. */
int aiorun_waitfuture_arm(PyObject *wait);
/* Take back the wake-ups passed on to the task; keeps any exception set. */
void aiorun_waitfuture_detach(PyObject *wait);
/* Ends the wait for the waiter's close(): its awaiter resumes, and the
 * wait's result() raises RuntimeError.  Keeps any exception set. */
void aiorun_waitfuture_close(PyObject *wait);
/* 1 if the wait was cancelled (the awaiting task gave up), else 0. */
int aiorun_waitfuture_cancelled(PyObject *wait);

/* ---- watchdog.c ---- */
/* Where the shutdown is; the watchdog names it when it ends the process. */
typedef enum {
    STAGE_STARTING,
    STAGE_RUNNING,
    STAGE_HANDLER,
    STAGE_SHUTDOWN,
    STAGE_CALLBACK,
    STAGE_DRAINING,
    STAGE_CANCELLING,
    STAGE_WAITING_TASKS,
    STAGE_EXECUTOR,
    STAGE_ASYNCGENS,
    STAGE_CLOSING,
    STAGE_LEAVING
} aiorun_stage;

typedef enum {
    REQUEST_SIGNAL = 1,
    REQUEST_LOOP_STOPPED,
    REQUEST_UNHANDLED_ERROR
} aiorun_request_reason;

/* deadline in seconds (0: none).  Sets run->watchdog.  Its faulthandler
 * signal is never avoid_signum (task_dump_signal's). */
int aiorun_watchdog_start(RunObject *run, double deadline, int exit_on_repeat,
                          int avoid_signum);
/* os.register_at_fork(after_in_child=_after_fork_child), once per module;
 * 0, or -1 with an exception. */
int aiorun_register_fork_hook(aiorun_state *st);
/* os.register_at_fork() hook: a child forked during run() gets a watchdog,
 * and the collector back on if the drain had paused it. */
PyObject *aiorun_after_fork_child(PyObject *module, PyObject *unused);
/* Joins the watchdog's threads; keeps any exception set.  No-op without. */
void aiorun_watchdog_stop(RunObject *run);
/* Instead of stop, with deadline_covers_exit: the watchdog bounds the
 * process's exit; a later run() that owns the process retires it. */
void aiorun_watchdog_hand_over(RunObject *run);
void aiorun_exit_guard_retire(aiorun_state *st);
/* _exit_began(): threading's hook as the interpreter begins to exit. */
PyObject *aiorun_exit_began(PyObject *module, PyObject *unused);
void aiorun_watchdog_stage(RunObject *run, aiorun_stage stage);
#ifndef MS_WINDOWS
/* For our own threads: every signal blocked but faults and keep (if > 0),
 * so none lands there by chance. */
void aiorun_block_signals(int keep);
#endif
/* Called once run->loop is set: the loop whose tasks a forced exit lists. */
void aiorun_watchdog_loop_ready(RunObject *run);
/* A shutdown was requested from Python code; the first request counts. */
void aiorun_watchdog_request(RunObject *run, aiorun_request_reason reason);

/* ---- notify.c ---- */
/* Reads NOTIFY_SOCKET and WATCHDOG_USEC; says STATUS=starting.  task_timeout
 * in seconds, -1 for None.  0, or -1 with an exception. */
int aiorun_notify_start(RunObject *run, double task_timeout);
/* Once the loop and main task exist: queues READY=1 (when ready_on_start)
 * and the first watchdog ping. */
int aiorun_notify_loop_ready(RunObject *run, int ready_on_start);
/* STOPPING=1, once; signum 0 for a KeyboardInterrupt out of the loop. */
void aiorun_notify_stopping(RunObject *run, int signum);
void aiorun_notify_stage(RunObject *run, aiorun_stage stage);
/* Cancels the pings and closes the socket; keeps any exception set. */
void aiorun_notify_stop(RunObject *run);
/* A reload begins (STATUS=reloading, and its time noted); it ended well
 * (exc NULL: RELOADING=1 with MONOTONIC_USEC and READY=1), or failed (only
 * a STATUS= that says so). */
void aiorun_notify_reloading(RunObject *run);
void aiorun_notify_reloaded(RunObject *run, PyObject *exc);
PyObject *aiorun_run_notify_ready(PyObject *self, PyObject *unused);
PyObject *aiorun_run_notify_watchdog(PyObject *self, PyObject *unused);
PyObject *aiorun_notify_ready(PyObject *module, PyObject *args, PyObject *kwargs);
/* message (and fd, passed as SCM_RIGHTS, when >= 0) to NOTIFY_SOCKET on a
 * socket of its own, from any thread: 1 if delivered; 0 if not, with
 * *problem a new str saying why, or NULL when NOTIFY_SOCKET is not set;
 * -1 with an exception.  refusal, when not NULL, is the problem: nothing
 * is sent. */
int aiorun_notify_oneshot(aiorun_state *st, const char *message, int fd,
                          const char *refusal, PyObject **problem);

/* ---- health.c: the health endpoint ---- */
typedef struct {
    PyObject *address;         /* a new str, or NULL: no endpoint */
    const char *source;        /* the parameter or variable it came from */
    double liveness_timeout;   /* seconds without a heartbeat: not alive */
} aiorun_health_args;
/* Checks health= and liveness_timeout= (and, with use_env, AIORUN_HEALTH
 * and AIORUN_LIVENESS_TIMEOUT).  0, or -1 with an exception. */
int aiorun_health_check(aiorun_state *st, PyObject *health, PyObject *liveness_timeout,
                        int use_env, aiorun_health_args *out);
/* Listens and starts the endpoint's threads (sets run->health); 0 or -1. */
int aiorun_health_start(RunObject *run, aiorun_health_args *args);
/* Called once run->loop is set: the heartbeat starts. */
int aiorun_health_loop_ready(RunObject *run);
PyObject *aiorun_run_health_beat(PyObject *self, PyObject *unused);
/* /readyz: the app is ready (READY=1's moment); the shutdown has begun. */
void aiorun_health_ready(RunObject *run);
void aiorun_health_stopping(RunObject *run);
/* The shutdown's stage: /livez stays 200 during the shutdown. */
void aiorun_health_stage(RunObject *run, int stage);
/* os.register_at_fork() hook: a child lets go of the parent's socket. */
void aiorun_health_after_fork(RunObject *run);
/* Ends the threads, closes the socket; keeps any exception set. */
void aiorun_health_stop(RunObject *run);

/* ---- report.c: the shutdown report ---- */
/* shutdown_report= (or, with use_env, AIORUN_SHUTDOWN_REPORT); 0 or -1. */
int aiorun_report_configure(RunObject *run, PyObject *arg, int use_env);
void aiorun_report_free(RunObject *run);
void aiorun_report_requested(RunObject *run);
void aiorun_report_stage(RunObject *run, int stage);
void aiorun_report_cancelled(RunObject *run);
void aiorun_report_protected(RunObject *run);
void aiorun_report_drained(RunObject *run, long n);
void aiorun_report_refused(RunObject *run, PyObject *task);
void aiorun_report_refused_text(RunObject *run, PyObject *description);
/* The summary line, and the JSON when asked; exc is what run() will raise
 * (borrowed, or NULL).  Never raises. */
void aiorun_report_end(RunObject *run, PyObject *exc);
/* On the watchdog's thread, without the GIL, just before _exit(). */
void aiorun_report_forced_exit(RunObject *run, int stage);
/* A stage's name in the report and in /livez ("waiting_for_tasks"). */
const char *aiorun_phase_name(int stage);

/* ---- fdstore.c: systemd's file descriptor store ---- */
PyObject *aiorun_store_fd(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *aiorun_remove_stored_fd(PyObject *module, PyObject *args, PyObject *kwargs);

/* ---- callargs.c ---- */
/* The shape of a call of fname(args, kwargs) against kwlist: at most
 * max_positional positional arguments, the first `required` of them
 * required, no unknown or doubled keyword.  0, or -1 with the TypeError
 * Python gives a def. */
int aiorun_check_call(const char *fname, PyObject *args, PyObject *kwargs,
                      char *const *kwlist, Py_ssize_t max_positional,
                      Py_ssize_t required);

/* ---- environ.c ---- */
/* os.environ[name] as bytes (*value, a new reference): 1; 0 when it is not
 * set (*value NULL); -1 with an exception. */
int aiorun_getenv(aiorun_state *st, const char *name, PyObject **value);
/* del os.environ[name] (and so unsetenv()), if it is there: 0, or -1. */
int aiorun_unsetenv(aiorun_state *st, const char *name);

/* ---- activation.c: socket activation ---- */
/* listen_fds() and listen_sockets(): {name: [fd or socket, ...]}. */
PyObject *aiorun_listen_fds(PyObject *module, PyObject *unused);
PyObject *aiorun_listen_sockets(PyObject *module, PyObject *unused);

/* ---- cli.c ---- */
/* _main(argv): python -m aiorun; returns 0 or raises (SystemExit(2) for a
 * usage error). */
PyObject *aiorun_cli_main(PyObject *module, PyObject *argv);

/* ---- sigwake.c (POSIX only) ---- */
#ifndef MS_WINDOWS
int aiorun_sigwake_install(int *read_fd, unsigned long *count_now);
void aiorun_sigwake_uninstall(void);
/* In a forked child: a pipe of its own; *count_now as for install. */
int aiorun_sigwake_after_fork(int *read_fd, unsigned long *count_now);
void aiorun_sigwake_poke(void);
unsigned long aiorun_sigwake_count(void);
int aiorun_sigwake_last_signum(void);
/* The first signal since install (0 if none yet); *at gets its
 * CLOCK_MONOTONIC time in seconds. */
int aiorun_sigwake_first_signum(double *at);
#endif

/* ---- stacks.c ---- */
/* A sequence of frames, outermost first, as traceback lines ending in a
 * newline each. */
PyObject *aiorun_format_frames(PyObject *frames);
/* A task's repr, then its await chain (the coroutine, what it awaits, and
 * so on) as traceback lines. */
PyObject *aiorun_format_task(PyObject *task);
/* frame and its callers as a list, outermost first. */
PyObject *aiorun_frame_chain(PyObject *frame);

#endif /* AIORUN_H */
