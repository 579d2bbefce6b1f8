/* The command line: python -m aiorun [options] package.module:function [args]
 *
 * Builds an argparse parser (the standard --help, usage errors and exit
 * code 2), resolves the target, and calls run() with the options given.
 * The app's own failure propagates out of python -m as any exception does
 * (traceback, exit 1; SystemExit keeps its code). */
#include "aiorun.h"

#include <stdarg.h>

#define PROG "python -m aiorun"

typedef enum {
    OPT_FLAG,       /* given: keyword=True */
    OPT_FLAG_OFF,   /* given: keyword=False */
    OPT_SECONDS,    /* a float, finite, >= 0 (or > 0 unless zero_ok) */
    OPT_COUNT,      /* an int > 0 */
    OPT_TEXT        /* a str, checked by run() */
} option_kind;

/* One option: its flag, the run() keyword it sets, and how it is read.
 * Flags left off and options not given keep run()'s defaults. */
typedef struct {
    const char *flag;
    const char *keyword;
    option_kind kind;
    int zero_ok;
    const char *help;
    const char *metavar;   /* for OPT_TEXT */
} cli_option;

static const cli_option options[] = {
    {"--no-ready-on-start", "notify_ready_on_start", OPT_FLAG_OFF, 0,
     "under systemd, leave READY=1 to the app's aiorun.notify_ready()", NULL},
    {"--uvloop", "use_uvloop", OPT_FLAG, 0, "run on a new uvloop event loop", NULL},
    {"--stop-on-unhandled-errors", "stop_on_unhandled_errors", OPT_FLAG, 0,
     "an unhandled error stops the loop; it is raised after the shutdown (exit 1)", NULL},
    {"--timeout-task-shutdown", "timeout_task_shutdown", OPT_SECONDS, 1,
     "seconds to wait for cancelled tasks (default 60)", NULL},
    {"--executor-workers", "executor_workers", OPT_COUNT, 0,
     "max_workers of the default ThreadPoolExecutor", NULL},
    {"--shutdown-deadline", "shutdown_deadline", OPT_SECONDS, 0,
     "seconds the whole shutdown may take; past it, exit code 124", NULL},
    {"--exit-on-repeated-signal", "exit_on_repeated_signal", OPT_FLAG, 0,
     "a second SIGINT/SIGTERM during the shutdown exits at once (code 124)", NULL},
    {"--deadline-covers-exit", "deadline_covers_exit", OPT_FLAG, 0,
     "the deadline also bounds the process's exit after run() returns", NULL},
    {"--drain-delay", "drain_delay", OPT_SECONDS, 1,
     "seconds the tasks get to finish before any is cancelled", NULL},
    {"--cancel-main-first", "cancel_main_first", OPT_FLAG, 0,
     "cancel the main task and wait for it before the other tasks", NULL},
    {"--task-dump", "task_dump_signal", OPT_FLAG, 0,
     "SIGUSR1 logs every task with its await chain", NULL},
    {"--reap-orphans", "reap_orphans", OPT_FLAG, 0,
     "as PID 1, reap orphaned child processes", NULL},
    {"--health", "health", OPT_TEXT, 0,
     "serve GET /readyz and GET /livez on HOST:PORT, :PORT (127.0.0.1) or a unix "
     "socket path, from a thread that needs no GIL", "ADDRESS"},
    {"--liveness-timeout", "liveness_timeout", OPT_SECONDS, 0,
     "seconds without a loop heartbeat before /livez answers 503 (default 10)", NULL},
    {"--shutdown-report", "shutdown_report", OPT_TEXT, 0,
     "write what the shutdown did to PATH as JSON, also on a forced exit", "PATH"},
};
#define N_OPTIONS (sizeof options / sizeof options[0])

#define DESCRIPTION                                                            \
    "Run an async main function under aiorun.run(): the loop runs until "      \
    "SIGINT or SIGTERM (or loop.stop()), then shuts down gracefully."
#define EPILOG                                                                 \
    "TARGET is module:function (an async function, or a function returning an " \
    "awaitable, called with no arguments) or module:attribute (an awaitable). " \
    "Options come before TARGET; everything after it is the app's own."

/* callable(*args, **kwargs-from-format); steals args. */
static PyObject *
call_with(PyObject *callable, PyObject *args, const char *format, ...)
{
    va_list va;
    va_start(va, format);
    PyObject *kwargs = args ? Py_VaBuildValue(format, va) : NULL;
    va_end(va);
    PyObject *res = kwargs ? PyObject_Call(callable, args, kwargs) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    return res;
}

static PyObject *
make_parser(void)
{
    PyObject *argparse = PyImport_ImportModule("argparse");
    if (argparse == NULL) {
        return NULL;
    }
    PyObject *cls = PyObject_GetAttrString(argparse, "ArgumentParser");
    PyObject *remainder = cls ? PyObject_GetAttrString(argparse, "REMAINDER") : NULL;
    Py_DECREF(argparse);
    PyObject *parser = remainder ? call_with(cls, PyTuple_New(0), "{ssssss}",
                                             "prog", PROG, "description", DESCRIPTION,
                                             "epilog", EPILOG) : NULL;
    Py_XDECREF(cls);
    PyObject *add = parser ? PyObject_GetAttrString(parser, "add_argument") : NULL;
    if (add == NULL) {
        goto fail;
    }
    PyObject *res = call_with(add, Py_BuildValue("(s)", "target"), "{ssss}",
                              "metavar", "TARGET", "help", "module:function to run");
    if (res == NULL) {
        goto fail;
    }
    Py_DECREF(res);
    res = call_with(add, Py_BuildValue("(s)", "args"), "{sOssss}", "nargs", remainder,
                    "metavar", "ARGS", "help", "the app's own arguments (sys.argv[1:])");
    /* ARGS may be empty: argparse before 3.14 calls a REMAINDER required,
     * and names it in "the following arguments are required". */
    if (res == NULL || PyObject_SetAttrString(res, "required", Py_False) < 0) {
        Py_XDECREF(res);
        goto fail;
    }
    Py_DECREF(res);
    res = call_with(add, Py_BuildValue("(s)", "--log-level"), "{ssssssss}", "dest",
                    "log_level", "metavar", "LEVEL", "default", "INFO", "help",
                    "log at LEVEL (DEBUG, INFO, WARNING, ERROR) to stderr, as "
                    "logging.basicConfig() does, unless the app has configured "
                    "logging when its module is imported; 'off' leaves logging "
                    "alone (default INFO)");
    if (res == NULL) {
        goto fail;
    }
    Py_DECREF(res);
    res = call_with(add, Py_BuildValue("(s)", "--reload-callback"), "{ssssss}", "dest",
                    "reload_callback", "metavar", "MODULE:FUNCTION", "help",
                    "on SIGHUP, call this function (async or not) while the app goes "
                    "on serving; under systemd, as Type=notify-reload expects");
    if (res == NULL) {
        goto fail;
    }
    Py_DECREF(res);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const cli_option *o = &options[i];
        if (o->kind == OPT_FLAG || o->kind == OPT_FLAG_OFF) {
            res = call_with(add, Py_BuildValue("(s)", o->flag), "{ssssss}", "action",
                            o->kind == OPT_FLAG ? "store_true" : "store_false",
                            "dest", o->keyword, "help", o->help);
        }
        else {
            PyObject *type = (PyObject *)(o->kind == OPT_COUNT ? &PyLong_Type
                                          : o->kind == OPT_TEXT ? &PyUnicode_Type
                                                                   : &PyFloat_Type);
            res = call_with(add, Py_BuildValue("(s)", o->flag), "{sOsssssssO}", "type",
                            type, "dest", o->keyword, "help", o->help, "metavar",
                            o->kind == OPT_COUNT ? "N"
                            : o->kind == OPT_TEXT ? o->metavar : "SECONDS",
                            "default", Py_None);
        }
        if (res == NULL) {
            goto fail;
        }
        Py_DECREF(res);
    }
    Py_DECREF(add);
    Py_DECREF(remainder);
    return parser;
fail:
    Py_XDECREF(add);
    Py_XDECREF(remainder);
    Py_XDECREF(parser);
    return NULL;
}

/* parser.error(message): prints the usage and exits with code 2. */
static PyObject *
usage_error(PyObject *parser, PyObject *message)
{
    if (message != NULL) {
        PyObject *res = PyObject_CallMethod(parser, "error", "O", message);
        Py_XDECREF(res);
        if (res != NULL) {
            /* An error() that returned (a parser class of someone's):
             * still a usage error, and never NULL without an exception. */
            PyObject *code = PyLong_FromLong(2);
            if (code != NULL) {
                PyErr_SetObject(PyExc_SystemExit, code);
                Py_DECREF(code);
            }
        }
        Py_DECREF(message);
    }
    return NULL;   /* SystemExit(2) is set, or the error that stopped it */
}

/* 1 if the ImportError `value` says the module `name` (or a package on
 * its way) is not there, as opposed to an import failing inside it. */
static int
names_target(PyObject *value, PyObject *name)
{
    PyObject *missing = PyObject_GetAttrString(value, "name");
    if (missing == NULL) {
        PyErr_Clear();
        return 0;
    }
    int found = 0;
    if (PyUnicode_Check(missing)) {
        PyObject *prefix = PyUnicode_FromFormat("%U.", missing);
        found = PyUnicode_Compare(missing, name) == 0
            || (prefix != NULL
                && PyUnicode_Tailmatch(name, prefix, 0, PY_SSIZE_T_MAX, -1) == 1);
        Py_XDECREF(prefix);
        PyErr_Clear();
    }
    Py_DECREF(missing);
    return found;
}

/* import name; a module that is not there is a usage error. */
static PyObject *
import_target(PyObject *parser, PyObject *name)
{
    PyObject *module = PyImport_Import(name);
    if (module != NULL || !PyErr_ExceptionMatches(PyExc_ModuleNotFoundError)) {
        return module;   /* an error inside the app's imports keeps its traceback */
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL || !names_target(value, name)) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    PyObject *message = PyUnicode_FromFormat("cannot import module '%U': %S", name, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return usage_error(parser, message);
}

/* module:attr.path -> the object; usage errors for what cannot be found.
 * what names it in them: "TARGET", or the option that gave it. */
static PyObject *
resolve_target(PyObject *parser, PyObject *target, const char *what)
{
    if (!PyUnicode_Check(target)) {
        return usage_error(parser, PyUnicode_FromFormat(
            "%s must be module:function, not %R", what, target));
    }
    Py_ssize_t len = PyUnicode_GetLength(target);
    if (len < 0) {
        return NULL;
    }
    Py_ssize_t colon = PyUnicode_FindChar(target, ':', 0, len, 1);
    if (colon == -2) {
        return NULL;
    }
    if (colon <= 0 || colon == len - 1) {
        return usage_error(parser, PyUnicode_FromFormat(
            "%s must be module:function, not %R", what, target));
    }
    PyObject *name = PyUnicode_Substring(target, 0, colon);
    PyObject *path = name ? PyUnicode_Substring(target, colon + 1, len) : NULL;
    PyObject *dot = path ? PyUnicode_FromString(".") : NULL;
    PyObject *parts = dot ? PyUnicode_Split(path, dot, -1) : NULL;
    PyObject *obj = parts ? import_target(parser, name) : NULL;
    for (Py_ssize_t i = 0; obj != NULL && i < PyList_GET_SIZE(parts); i++) {
        PyObject *next = PyObject_GetAttr(obj, PyList_GET_ITEM(parts, i));
        Py_SETREF(obj, next);
        if (obj == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            obj = usage_error(parser, PyUnicode_FromFormat(
                "module '%U' has no attribute '%U'", name, path));
        }
    }
    Py_XDECREF(name);
    Py_XDECREF(path);
    Py_XDECREF(dot);
    Py_XDECREF(parts);
    return obj;
}

/* What run() is given: the target called (it must give an awaitable), or
 * the target itself when it is an awaitable already. */
static PyObject *
main_awaitable(aiorun_state *st, PyObject *parser, PyObject *target, PyObject *obj)
{
    PyObject *aw = PyCallable_Check(obj) ? PyObject_CallNoArgs(obj) : Py_NewRef(obj);
    if (aw == NULL) {
        return NULL;
    }
    PyObject *check = PyObject_CallOneArg(st->isawaitable, aw);
    int ok = check ? PyObject_IsTrue(check) : -1;
    Py_XDECREF(check);
    if (ok < 0) {
        Py_DECREF(aw);
        return NULL;
    }
    if (ok) {
        return aw;
    }
    PyObject *message = PyUnicode_FromFormat(
        "TARGET %R must be an async function or an awaitable; %s %.100s",
        target, PyCallable_Check(obj) ? "calling it gave" : "it is",
        Py_TYPE(aw)->tp_name);
    Py_DECREF(aw);
    return usage_error(parser, message);
}

/* 1 if value breaks the bound of option o, 0 if not, -1 on error. */
static int
refused(const cli_option *o, PyObject *value)
{
    if (o->kind == OPT_COUNT) {
        int overflow;   /* a count beyond a C long is still a count */
        long n = PyLong_AsLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred()) {
            return -1;
        }
        return overflow < 0 || (overflow == 0 && n <= 0);
    }
    double x = PyFloat_AsDouble(value);
    if (x == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    return !(x >= 0) || x == Py_HUGE_VAL || (x == 0 && !o->zero_ok);
}

/* The options given, as run()'s keyword arguments; a usage error for a
 * value run() would refuse, so the shell gets exit code 2 and the usage. */
static PyObject *
run_kwargs(PyObject *parser, PyObject *ns)
{
    PyObject *kwargs = PyDict_New();
    for (size_t i = 0; kwargs != NULL && i < N_OPTIONS; i++) {
        const cli_option *o = &options[i];
        PyObject *value = PyObject_GetAttrString(ns, o->keyword);
        if (value == NULL) {
            Py_CLEAR(kwargs);
            break;
        }
        int given = o->kind == OPT_FLAG ? value == Py_True
                  : o->kind == OPT_FLAG_OFF ? value == Py_False
                  : value != Py_None;
        int bad = given && (o->kind == OPT_SECONDS || o->kind == OPT_COUNT)
            ? refused(o, value) : 0;
        if (bad > 0) {
            PyObject *message = PyUnicode_FromFormat(
                "argument %s: must be %s, not %R", o->flag,
                o->kind == OPT_COUNT ? "> 0" : o->zero_ok ? ">= 0 and finite"
                                                          : "> 0 and finite", value);
            Py_DECREF(value);
            Py_DECREF(kwargs);
            return usage_error(parser, message);
        }
        if (bad < 0 || (given && PyDict_SetItemString(kwargs, o->keyword, value) < 0)) {
            Py_CLEAR(kwargs);
        }
        Py_DECREF(value);
    }
    return kwargs;
}

/* --health, --liveness-timeout and --shutdown-report as run() would check
 * them, so that a value it refuses is a usage error (exit code 2) too. */
static int
check_health_options(aiorun_state *st, PyObject *parser, PyObject *kwargs)
{
    PyObject *health = PyDict_GetItemString(kwargs, "health");          /* borrowed */
    PyObject *timeout = PyDict_GetItemString(kwargs, "liveness_timeout");
    PyObject *report = PyDict_GetItemString(kwargs, "shutdown_report");
    if (report != NULL && PyUnicode_Check(report) && PyUnicode_GET_LENGTH(report) == 0) {
        return usage_error(parser, PyUnicode_FromString(
            "argument --shutdown-report: must be a path")) ? 0 : -1;
    }
    if (health == NULL && timeout == NULL) {
        return 0;
    }
    aiorun_health_args checked;
    if (aiorun_health_check(st, health ? health : Py_None, timeout ? timeout : Py_None,
                            0, &checked) == 0) {
        Py_XDECREF(checked.address);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
        return -1;
    }
    PyObject *exc = aiorun_take_error();
    PyObject *text = exc ? PyObject_Str(exc) : NULL;
    Py_XDECREF(exc);
    if (text == NULL) {
        return -1;
    }
    PyObject *message = PyUnicode_FromFormat(
        "argument %s: %U", health && !timeout ? "--health"
                           : !health ? "--liveness-timeout" : "--health/--liveness-timeout",
        text);
    Py_DECREF(text);
    return usage_error(parser, message) ? 0 : -1;
}

/* --log-level: logging.basicConfig(level=LEVEL) unless it is "off" or the
 * root logger has handlers already (the app configured logging as its
 * module was imported).  0, or -1 with an exception (a usage error for a
 * level logging does not know). */
static int
configure_logging(PyObject *parser, PyObject *ns)
{
    PyObject *level = PyObject_GetAttrString(ns, "log_level");
    if (level == NULL) {
        return -1;
    }
    if (!PyUnicode_Check(level)
        || PyUnicode_CompareWithASCIIString(level, "off") == 0
        || PyUnicode_CompareWithASCIIString(level, "OFF") == 0) {
        Py_DECREF(level);
        return 0;
    }
    PyObject *logging = PyImport_ImportModule("logging");
    PyObject *upper = logging ? PyObject_CallMethod(level, "upper", NULL) : NULL;
    PyObject *known = upper ? PyObject_CallMethod(logging, "getLevelName", "O", upper)
                            : NULL;
    int rc = -1;
    if (known != NULL && !PyLong_Check(known)) {
        /* getLevelName() maps a name it does not know to "Level NAME". */
        PyObject *message = PyUnicode_FromFormat(
            "argument --log-level: not a logging level: %R (DEBUG, INFO, WARNING, "
            "ERROR, CRITICAL or off)", level);
        Py_XDECREF(usage_error(parser, message));
        goto done;
    }
    PyObject *root = known ? PyObject_CallMethod(logging, "getLogger", NULL) : NULL;
    PyObject *handlers = root ? PyObject_GetAttrString(root, "handlers") : NULL;
    int has = handlers ? PyObject_IsTrue(handlers) : -1;
    Py_XDECREF(root);
    Py_XDECREF(handlers);
    if (has == 0) {
        PyObject *config = PyObject_GetAttrString(logging, "basicConfig");
        PyObject *res = config ? call_with(config, PyTuple_New(0), "{sO}", "level", known)
                               : NULL;
        Py_XDECREF(config);
        if (res != NULL) {
            Py_DECREF(res);
            rc = 0;
        }
    }
    else if (has > 0) {
        rc = 0;   /* the app's own configuration stays */
    }
done:
    Py_DECREF(level);
    Py_XDECREF(logging);
    Py_XDECREF(upper);
    Py_XDECREF(known);
    return rc;
}

/* --reload-callback module:function: run()'s reload_callback, which must
 * be callable.  0, or -1 with an exception (a usage error). */
static int
add_reload_callback(PyObject *parser, PyObject *ns, PyObject *kwargs)
{
    PyObject *name = PyObject_GetAttrString(ns, "reload_callback");
    if (name == NULL) {
        return -1;
    }
    if (name == Py_None) {
        Py_DECREF(name);
        return 0;
    }
    PyObject *callback = resolve_target(parser, name, "argument --reload-callback");
    if (callback != NULL && !PyCallable_Check(callback)) {
        PyObject *message = PyUnicode_FromFormat(
            "argument --reload-callback: %R is %.100s, not a function", name,
            Py_TYPE(callback)->tp_name);
        Py_SETREF(callback, usage_error(parser, message));
    }
    int rc = callback ? PyDict_SetItemString(kwargs, "reload_callback", callback) : -1;
    Py_XDECREF(callback);
    Py_DECREF(name);
    return rc;
}

static int
is_double_dash(PyObject *arg)
{
    return PyUnicode_Check(arg) && PyUnicode_CompareWithASCIIString(arg, "--") == 0;
}

/* Did argparse drop the "--" that followed TARGET?  rest (n_rest items)
 * ends argv; what stands before it there is then "--", after the target. */
static int
separator_dropped(PyObject *argv, PyObject *target, Py_ssize_t n_rest)
{
    if (!PyList_Check(argv)) {
        return 0;
    }
    Py_ssize_t at = PyList_GET_SIZE(argv) - n_rest - 1;
    if (at < 1 || !is_double_dash(PyList_GET_ITEM(argv, at))) {
        return 0;
    }
    PyObject *before = PyList_GET_ITEM(argv, at - 1);
    return PyUnicode_Check(before) && PyUnicode_Check(target)
        && PyUnicode_Compare(before, target) == 0;
}

PyObject *
aiorun_cli_main(PyObject *module, PyObject *argv)
{
    aiorun_state *st = aiorun_get_state(module);
    PyObject *parser = make_parser();
    if (parser == NULL) {
        return NULL;
    }
    PyObject *result = NULL, *obj = NULL, *aw = NULL, *kwargs = NULL, *run = NULL;
    PyObject *ns = PyObject_CallMethod(parser, "parse_args", "O", argv);
    PyObject *target = ns ? PyObject_GetAttrString(ns, "target") : NULL;
    PyObject *rest = target ? PyObject_GetAttrString(ns, "args") : NULL;
    if (rest == NULL) {
        goto done;
    }
    /* The app sees its own command line: the target, then what follows. */
    PyObject *app_argv = PyList_New(1);
    if (app_argv == NULL) {
        goto done;
    }
    PyList_SET_ITEM(app_argv, 0, Py_NewRef(target));
    /* One "--" right after TARGET separates, and the app does not see it;
     * any other is the app's.  Some argparse versions drop that one from
     * REMAINDER themselves (3.9-3.13), others keep it: it is dropped here
     * unless the command line shows argparse did. */
    Py_ssize_t skip = PyList_Check(rest) && PyList_GET_SIZE(rest) > 0
        && is_double_dash(PyList_GET_ITEM(rest, 0))
        && !separator_dropped(argv, target, PyList_GET_SIZE(rest));
    PyObject *tail = PyList_Check(rest) ? PyList_GetSlice(rest, skip, PY_SSIZE_T_MAX)
                                        : PySequence_List(rest);
    int rc = tail ? PyList_SetSlice(app_argv, 1, 1, tail) : -1;
    Py_XDECREF(tail);
    rc = rc == 0 ? PySys_SetObject("argv", app_argv) : -1;
    Py_DECREF(app_argv);
    if (rc < 0
        || (kwargs = run_kwargs(parser, ns)) == NULL
        || check_health_options(st, parser, kwargs) < 0
        || (obj = resolve_target(parser, target, "TARGET")) == NULL
        || add_reload_callback(parser, ns, kwargs) < 0
        || configure_logging(parser, ns) < 0
        || (aw = main_awaitable(st, parser, target, obj)) == NULL
        || (run = PyObject_GetAttrString(module, "run")) == NULL) {
        goto done;
    }
    PyObject *args = PyTuple_Pack(1, aw);
    PyObject *res = args ? PyObject_Call(run, args, kwargs) : NULL;
    Py_XDECREF(args);
    if (res != NULL) {
        Py_DECREF(res);
        result = PyLong_FromLong(0);
    }
done:
    Py_XDECREF(run);
    Py_XDECREF(aw);
    Py_XDECREF(obj);
    Py_XDECREF(kwargs);
    Py_XDECREF(rest);
    Py_XDECREF(target);
    Py_XDECREF(ns);
    Py_DECREF(parser);
    return result;
}
