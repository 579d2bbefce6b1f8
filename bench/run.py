"""The benchmark: this aiorun against the original aiorun 2025.1.1
and against a hand-written shutdown in bare asyncio.  `make bench` sets up the two virtual
environments and runs this with the first one's interpreter.

    python bench/run.py [--runs 5] [--sizes 1e3,1e4,1e5,1e6] [--out bench]
    python bench/run.py --smoke        # tiny sizes, one run, no files

Every figure comes from child processes started one after the other, the
sides taking turns (the first side rotates each round), and is quoted as a
median with its min-max; the tables give ratios, since only those survive
a shared, noisy machine.  Writes OUT/RESULTS.md, OUT/results.json (every
sample) and OUT/shutdown.png.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENVS = os.path.join(ROOT, ".venvs")
PYTHON = {
    "ours": os.path.join(VENVS, "bench-ours", "bin", "python"),
    "original": os.path.join(VENVS, "bench-original", "bin", "python"),
    # The hand-written side imports no aiorun; any of the two interpreters will do.
    "floor": os.path.join(VENVS, "bench-ours", "bin", "python"),
}
SIDES = ["ours", "original", "floor"]
LOOPS = ["asyncio", "uvloop"]
CHILD_TIMEOUT = 900  # seconds; a 1e6-task run takes well under a minute


def now():
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def rounds(runs, sides):
    """Yield (round, side), the sides taking turns, the first one rotating."""
    for r in range(runs):
        for i in range(len(sides)):
            yield r, sides[(r + i) % len(sides)]


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---- 1. shutdown latency and peak RSS ----

def one_shutdown(side, loop, kind, n):
    """Start the app, wait for "ready", SIGTERM it; seconds to the end of
    run() and to the process exit, and the child's peak RSS in MiB."""
    cmd = [PYTHON[side], os.path.join(HERE, "shutdown_app.py"), side, loop, kind, str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise SystemExit(f"{side}/{loop}/{kind}/{n}: no ready line: {line!r} "
                         f"{proc.stderr.read()[-2000:]}")
    sent = now()
    proc.send_signal(signal.SIGTERM)
    ended = proc.stdout.readline().split()
    _, status, usage = os.wait4(proc.pid, 0)
    exited = now()
    errors = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Both aiorun log "Stopping the loop" at the signal; anything else on
    # stderr means the run was not the clean shutdown being timed.
    noise = [l for l in errors.splitlines() if l.strip() and l != "Stopping the loop"]
    if proc.returncode != 0 or len(ended) != 2 or noise:
        raise SystemExit(f"{side}/{loop}/{kind}/{n}: exit {proc.returncode}, "
                         f"output {ended!r}, stderr {errors[-2000:]!r}")
    return float(ended[1]) - sent, exited - sent, usage.ru_maxrss / 1024


def bench_shutdown(configs, runs, log):
    """configs: list of (kind, n, loop).  Returns {(kind, n, loop, side):
    {"end": [...], "exit": [...], "rss": [...]}}."""
    results = {}
    for kind, n, loop in configs:
        for r, side in rounds(runs, SIDES):
            to_end, to_exit, rss = one_shutdown(side, loop, kind, n)
            slot = results.setdefault((kind, n, loop, side),
                                      {"end": [], "exit": [], "rss": []})
            slot["end"].append(to_end)
            slot["exit"].append(to_exit)
            slot["rss"].append(rss)
            log(f"  {kind:7} N={n:<8} {loop:7} {side:8} round {r + 1}: "
                f"end {to_end:8.4f} s  exit {to_exit:8.4f} s  rss {rss:7.0f} MiB")
    return results


# ---- 2. shutdown_waits_for per call ----

def bench_waits_for(runs, calls, log):
    """{(side, loop, way): [microseconds per call, one per run]}."""
    samples = {}
    for loop in LOOPS:
        for r, side in rounds(runs, ["ours", "original"]):
            out = subprocess.run([PYTHON[side], os.path.join(HERE, "waits_for.py"),
                                  str(calls), "--loop", loop],
                                 capture_output=True, text=True, check=True,
                                 timeout=CHILD_TIMEOUT).stdout
            for line in out.splitlines():
                way, micros = line.split()
                samples.setdefault((side, loop, way), []).append(float(micros))
            log(f"  waits_for {loop:7} {side:8} round {r + 1}: {' '.join(out.split())}")
    return samples


def profile_waits_for(calls, log):
    """{loop: bench/waits_for_profile.py's figures}, or {} without valgrind."""
    profiles = {}
    for loop in LOOPS:
        proc = subprocess.run([PYTHON["ours"], os.path.join(HERE, "waits_for_profile.py"),
                               "--calls", str(calls), "--loop", loop],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        if proc.returncode == 3:
            log("  profile skipped: valgrind is not installed")
            return {}
        if proc.returncode != 0:
            raise SystemExit(f"waits_for_profile.py --loop {loop}: {proc.stderr[-2000:]}")
        profiles[loop] = json.loads(proc.stdout)
        p = profiles[loop]
        log(f"  profile {loop:7}: task {p['task']:.0f}, waits_for {p['waits_for']:.0f} "
            f"instructions per call")
    return profiles


# ---- 3. import time, and start-up to the first line of main() ----

IMPORTS = {
    "import asyncio": ("ours", "import asyncio"),
    "import aiorun (ours)": ("ours", "import aiorun"),
    "import aiorun (original)": ("original", "import aiorun"),
}

STARTUPS = {
    "asyncio.run(main())": ("ours", "asyncio"),
    "aiorun.run(main()) (ours)": ("ours", "ours"),
    "aiorun.run(main()) (original)": ("original", "original"),
}


def bench_import(runs, log):
    """{name: {"wall": [...], "cpu": [...]}}: the process's wall time, and
    its CPU time (user + system, from wait4), which a throttled or busy
    machine stretches far less than the wall time."""
    samples = {name: {"wall": [], "cpu": []} for name in IMPORTS}
    names = list(IMPORTS)
    for r, name in rounds(runs, names):
        side, statement = IMPORTS[name]
        start = time.perf_counter()
        proc = subprocess.Popen([PYTHON[side], "-c", statement])
        _, status, usage = os.wait4(proc.pid, 0)
        samples[name]["wall"].append(time.perf_counter() - start)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: exit {proc.returncode}")
        samples[name]["cpu"].append(usage.ru_utime + usage.ru_stime)
    log_medians(samples, log)
    return samples


def log_medians(samples, log):
    for name, values in samples.items():
        log(f"  {name:30} median wall {statistics.median(values['wall']) * 1e3:7.2f} ms"
            f"  cpu {statistics.median(values['cpu']) * 1e3:7.2f} ms")


def bench_startup(runs, log):
    """{name: {"wall": [...], "cpu": [...]}}: from the script's first line
    to the first line of main(), as bench/startup.py measures it."""
    samples = {name: {"wall": [], "cpu": []} for name in STARTUPS}
    names = list(STARTUPS)
    for r, name in rounds(runs, names):
        side, way = STARTUPS[name]
        out = subprocess.run([PYTHON[side], os.path.join(HERE, "startup.py"), way],
                             capture_output=True, text=True, check=True,
                             timeout=CHILD_TIMEOUT).stdout.split()
        samples[name]["wall"].append(float(out[0]))
        samples[name]["cpu"].append(float(out[1]))
    log_medians(samples, log)
    return samples


# ---- report ----

def fmt_s(s, digits=None):
    if digits is None:
        digits = 4 if s["median"] < 10 else 2
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ratio(a, b):
    return statistics.median(a) / statistics.median(b)


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for side in ("ours", "original"):
        versions[side] = subprocess.run(
            [PYTHON[side], "-c",
             "import platform, uvloop, aiorun; "
             "print(platform.python_version(), uvloop.__version__, aiorun.__version__)"],
            capture_output=True, text=True, check=True).stdout.split()
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "commit": commit or "unknown",
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": versions["ours"][0],
        "uvloop": versions["ours"][1],
        "original": versions["original"][2],
    }


def targets(shutdown, sizes, waits, imports):
    """(target, figure, met) for each goal."""
    rows = []
    big = max(sizes)
    for loop in LOOPS:
        key = ("idle", big, loop)
        ours = shutdown[key + ("ours",)]["end"]
        rows.append((f"shutdown, {big:,} idle tasks, {loop}: ≤ 0.70× the original",
                     f"{ratio(ours, shutdown[key + ('original',)]['end']):.2f}×",
                     ratio(ours, shutdown[key + ("original",)]["end"]) <= 0.70))
        rows.append((f"shutdown, {big:,} idle tasks, {loop}: ≤ 1.00× a hand-written shutdown",
                     f"{ratio(ours, shutdown[key + ('floor',)]['end']):.2f}×",
                     ratio(ours, shutdown[key + ("floor",)]["end"]) <= 1.0))
    worst = max(ratio(shutdown[k[:3] + ("ours",)]["end"], shutdown[k[:3] + ("original",)]["end"])
                for k in shutdown if k[3] == "ours")
    rows.append(("shutdown, every N, kind and loop: no slower than the original",
                 f"worst {worst:.2f}×", worst <= 1.0))
    for loop in LOOPS:
        w = ratio(waits[("ours", loop, "waits_for")], waits[("ours", loop, "bare")])
        rows.append((f"`await shutdown_waits_for(coro)`, {loop}: ≤ 2.0× a bare await",
                     f"{w:.2f}×", w <= 2.0))
        w = ratio(waits[("ours", loop, "waits_for")], waits[("ours", loop, "task")])
        rows.append((f"`await shutdown_waits_for(coro)`, {loop}: ≤ 1.05× `await "
                     "loop.create_task(coro)`", f"{w:.2f}×", w <= 1.05))
    for loop in LOOPS:
        w = ratio(waits[("ours", loop, "waits_for")], waits[("original", loop, "waits_for")])
        rows.append((f"`await shutdown_waits_for(coro)`, {loop}: below the original",
                     f"{w:.2f}×", w < 1.0))
    i = ratio(imports["import aiorun (ours)"]["cpu"], imports["import asyncio"]["cpu"])
    rows.append(("`import aiorun`: ≤ 1.02× `import asyncio` (CPU time)", f"{i:.3f}×",
                 i <= 1.02))
    for loop in LOOPS:
        key = ("idle", big, loop)
        m = ratio(shutdown[key + ("ours",)]["rss"], shutdown[key + ("original",)]["rss"])
        rows.append((f"peak RSS, {big:,} tasks, {loop}: ≤ the original's", f"{m:.3f}×",
                     m <= 1.0))
    return rows


def time_table(w, what, samples, base_name):
    """CPU and wall milliseconds of each entry, and ÷ those of base_name."""
    w(f"| {what} | CPU ms | ÷ `{base_name}` | wall ms | ÷ `{base_name}` |")
    w("|---|---|---|---|---|")
    base = samples[base_name]
    for name, values in samples.items():
        cpu = summary([v * 1e3 for v in values["cpu"]])
        wall = summary([v * 1e3 for v in values["wall"]])
        w(f"| `{name}` | {fmt_s(cpu, 1)} | {ratio(values['cpu'], base['cpu']):.3f} "
          f"| {fmt_s(wall, 1)} | {ratio(values['wall'], base['wall']):.3f} |")
    w("")


def systemd_section():
    """The restarts and reloads under load that make test-systemd measured
    (bench/systemd-SUITE.md, which it writes), as a section of their own."""
    parts = []
    for suite, version in (("trixie", "257"), ("bookworm", "252")):
        path = os.path.join(HERE, f"systemd-{suite}.md")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f"Under systemd {version} (Debian {suite}):\n\n{f.read().strip()}\n")
    if not parts:
        return ""
    return ("\n## 5. Restarts and reloads under systemd\n\n"
            "Measured by `make test-systemd`, not by this benchmark (it boots the "
            "Debian roots): 8 client threads, a new connection per request, while "
            "`systemctl restart` or `reload` runs 20 times; beside each service with "
            "socket activation, the same app binding its port itself.\n\n"
            + "\n".join(parts))


def report(args, facts, shutdown, configs, waits, profiles, imports, startups, command):
    out = []
    w = out.append
    w("# Benchmark results\n")
    w(f"Made {datetime.date.today().isoformat()} by `{command}` at commit {facts['commit']} "
      f"on {facts['cores']} cores "
      f"({facts['cpu']}), Linux {facts['kernel']}, CPython {facts['python']}, "
      f"uvloop {facts['uvloop']}; the original is aiorun {facts['original']} from PyPI. "
      f"{args.runs} runs of each side, the sides taking turns; medians, min–max in "
      f"brackets. Regenerate with `make bench` (see bench/run.py).\n")
    w("## Targets\n")
    w("| goal | this run | met |\n|---|---|---|")
    sizes = sorted({n for kind, n, _ in configs if kind == "idle"})
    for name, figure, met in targets(shutdown, sizes, waits, imports):
        w(f"| {name} | {figure} | {'yes' if met else '**no**'} |")
    w("")
    w("## 1. Shutdown latency\n")
    w("From SIGTERM (sent once the app printed that every task is waiting) to the "
      "end of `run()` and to the exit of the process. *idle*: N tasks, a third each "
      "in `asyncio.sleep`, on a bare future and in `Queue.get` on a queue of their own. "
      "*streams*: N tasks each reading a stream on a socket pair of its own, up to the "
      "file-descriptor limit. The hand-written side is the least a correct shutdown does by hand "
      "(bench/shutdown_app.py): stop on the signal, cancel every task, gather them, "
      "close the loop.\n")
    w("| tasks | N | loop | ours, to end of run() s | original s | hand-written s "
      "| ours/original | ours/hand-written | to exit: ours/original | ours/hand-written |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for kind, n, loop in configs:
        s = {side: shutdown[(kind, n, loop, side)] for side in SIDES}
        w(f"| {kind} | {n:,} | {loop} | {fmt_s(summary(s['ours']['end']))} "
          f"| {fmt_s(summary(s['original']['end']))} | {fmt_s(summary(s['floor']['end']))} "
          f"| {ratio(s['ours']['end'], s['original']['end']):.2f} "
          f"| {ratio(s['ours']['end'], s['floor']['end']):.2f} "
          f"| {ratio(s['ours']['exit'], s['original']['exit']):.2f} "
          f"| {ratio(s['ours']['exit'], s['floor']['exit']):.2f} |")
    w("\n![shutdown latency against N](shutdown.png)\n")
    w("## 2. `shutdown_waits_for` per call\n")
    w("`await X` of a coroutine that yields to the loop once (`asyncio.sleep(0)`), "
      "microseconds of CPU time per call (best of three rounds of "
      f"{args.calls:,} calls, the ways taking turns), each side in its own interpreter. "
      "*task* is `await loop.create_task(coro)`: the least any protection costs, since "
      "the protected work must run as a task of its own that outlives its caller.\n")
    w("| loop | way | ours µs | original µs | ours ÷ original | ours ÷ task "
      "| original ÷ task |")
    w("|---|---|---|---|---|---|---|")
    for loop in LOOPS:
        for way in ("bare", "task", "shield", "waits_for"):
            o, g = waits[("ours", loop, way)], waits[("original", loop, way)]
            name = {"bare": "bare `await coro`", "task": "`await create_task(coro)`",
                    "shield": "`await asyncio.shield(coro)`",
                    "waits_for": "`await shutdown_waits_for(coro)`"}[way]
            w(f"| {loop} | {name} | {fmt_s(summary(o), 2)} | {fmt_s(summary(g), 2)} "
              f"| {ratio(o, g):.2f} | {ratio(o, waits[('ours', loop, 'task')]):.2f} "
              f"| {ratio(g, waits[('original', loop, 'task')]):.2f} |")
    w("")
    w(profile_section(profiles))
    w("## 3. Import, and start-up to the first line of `main()`\n")
    w("`python -c \"...\"`, the whole process: its CPU time (user + system), which "
      "the target uses, and its wall time, which a busy or throttled machine "
      "stretches.\n")
    time_table(w, "command", imports, "import asyncio")
    w("What a user waits for before their code runs (bench/startup.py): from the "
      "script's first line, before any import, to the first line of `main()`: the "
      "import, making the loop, the signal handlers and (for aiorun) the default "
      "executor. CPU time of the process over that span, and wall time.\n")
    time_table(w, "script", startups, "asyncio.run(main())")
    w("## 4. Peak RSS\n")
    w("| N | loop | ours MiB | original MiB | hand-written MiB | ours/original |")
    w("|---|---|---|---|---|---|")
    for kind, n, loop in configs:
        if kind != "idle" or n != max(sizes):
            continue
        s = {side: shutdown[(kind, n, loop, side)]["rss"] for side in SIDES}
        w(f"| {n:,} | {loop} | {statistics.median(s['ours']):.0f} "
          f"| {statistics.median(s['original']):.0f} | {statistics.median(s['floor']):.0f} "
          f"| {ratio(s['ours'], s['original']):.3f} |")
    return "\n".join(out) + "\n"


ASYNCIO_OBJECT = "_asyncio (asyncio's C)"


def profile_section(profiles):
    """Section 2b of RESULTS.md, from bench/waits_for_profile.py's figures."""
    out = ["### 2b. Where the rest goes\n"]
    w = out.append
    if not profiles:
        w("Not measured: valgrind is not installed (bench/waits_for_profile.py).\n")
        return "\n".join(out)
    w("Instructions per call, counted by callgrind (bench/waits_for_profile.py), which "
      "a shared machine cannot disturb: each way run alone, with and without "
      f"{next(iter(profiles.values()))['calls']:,} calls; the extra is split by the "
      "object file that executed it.\n")
    w("| loop | `await create_task(coro)` | `await shutdown_waits_for(coro)` | ratio "
      "| extra | of which ours (_aiorun) | _asyncio | CPython core and ld.so "
      "| one `asyncio.Future` made and freed |")
    w("|---|---|---|---|---|---|---|---|---|")
    for loop, p in profiles.items():
        by = p["by_object"]
        core = sum(v for k, v in by.items() if k.startswith(("CPython", "ld.so", "inlined")))
        w(f"| {loop} | {p['task']:,.0f} | {p['waits_for']:,.0f} "
          f"| {p['waits_for'] / p['task']:.3f} | {p['waits_for'] - p['task']:,.0f} "
          f"| {by.get('_aiorun (ours)', 0):,.0f} | {by.get(ASYNCIO_OBJECT, 0):,.0f} "
          f"| {core:,.0f} | {p['one_future']:,.0f} |")
    w("")
    loop, p = next(iter(profiles.items()))
    w(f"The functions the extra runs in ({loop}; instructions per call, most first): "
      + ", ".join(f"`{name.split(':')[-1]}` {cost:,.0f}" for name, cost in p["top"][:12])
      + ".\n")
    w("What they are, and whose:\n")
    w("- **asyncio's generic path for a future-like (the largest share).** The awaiting "
      "task waits on a `ShutdownWaitFuture`, the object whose `cancel()` ends only the "
      "wait: that is what lets a cancelled awaiter leave while the work runs on. "
      "`_asyncio`'s Task takes its fast path only for an exact `asyncio.Future` or "
      "`Task`; for any other future-like its step looks up `_asyncio_future_blocking`, "
      "calls `get_loop()`, sets the flag back, makes a bound `add_done_callback` and "
      "calls it with `context=`, and its wake-up calls `result()` by name. The "
      "instructions run in the CPython core (`_PyObject_GetMethod`, `_PyType_Lookup`, "
      "dict lookups, `PyCMethod_New`). The fast path would need one `asyncio.Future` "
      "per call, and making and freeing one alone costs 35-45% of the whole extra "
      "(last column), before the code that would set it.")
    w("- **CPython's argument clinic.** The wake-up is passed on to the protected task "
      "with `task.add_done_callback(fn, context=...)`, whose keyword parsing "
      "(`_PyArg_UnpackKeywords`) is paid once per call.")
    w("- **Ours.** Two small objects (the awaitable `shutdown_waits_for()` returns, and "
      "the wait), the `_aiorun_protected` mark (the task's `__dict__`, made and freed), "
      "and `done()`/`result()` on the task; `__tls_get_addr` is the thread-state lookup "
      "each C API call makes in pyenv's shared libpython.")
    w("")
    return "\n".join(out)


def plot(shutdown, configs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = {"ours": "tab:blue", "original": "tab:orange", "floor": "tab:grey"}
    for loop in LOOPS:
        ns = sorted(n for kind, n, l in configs if kind == "idle" and l == loop)
        for side in SIDES:
            s = [summary(shutdown[("idle", n, loop, side)]["end"]) for n in ns]
            med = [x["median"] for x in s]
            err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
            ax.errorbar(ns, med, yerr=err, marker="o", capsize=3, color=colours[side],
                        linestyle="-" if loop == "asyncio" else "--",
                        label=f"{'hand-written' if side == 'floor' else side}, {loop}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("idle tasks (N)")
    ax.set_ylabel("SIGTERM to end of run(), seconds (median, min–max)")
    ax.set_title("Shutdown latency: this aiorun, aiorun 2025.1.1, bare asyncio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6",
                        help="task counts of the idle runs (comma-separated)")
    parser.add_argument("--calls", type=int, default=20000,
                        help="shutdown_waits_for calls per round")
    parser.add_argument("--profile-calls", type=int, default=2000,
                        help="calls per callgrind run of bench/waits_for_profile.py")
    parser.add_argument("--out", default=HERE, help="where RESULTS.md and the plot go")
    parser.add_argument("--sections", default="shutdown,waits_for,import",
                        help="which to measure; the others are read back from "
                             "OUT/results.json of an earlier run")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one run, to check that it works; no files")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.sizes, args.calls, args.profile_calls = 1, "100,300", 500, 20

    # Stream runs need two descriptors a task: take the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    stream_max = (hard - 100) // 2
    stream_sizes = sorted({min(n, stream_max) for n in (min(sizes), 10 ** 6)})
    if args.smoke:
        stream_sizes = [50]
    configs = ([("idle", n, loop) for n in sizes for loop in LOOPS]
               + [("streams", n, loop) for n in stream_sizes for loop in LOOPS])

    def log(text):
        print(text, flush=True)

    started = time.monotonic()
    facts = machine()
    log(f"CPython {facts['python']}, uvloop {facts['uvloop']}, {facts['cores']} cores, "
        f"{args.runs} runs per side")
    sections = set(args.sections.split(","))
    earlier = {}
    if sections != {"shutdown", "waits_for", "import"}:
        with open(os.path.join(args.out, "results.json")) as f:
            earlier = json.load(f)
        facts["commit"] += f" ({', '.join(sorted(sections))}; the rest at " \
                           f"{earlier['machine']['commit']})"
    if "shutdown" in sections:
        log("1. shutdown latency")
        shutdown = bench_shutdown(configs, args.runs, log)
    else:
        shutdown = {(k.split("/")[0], int(k.split("/")[1]), *k.split("/")[2:]): v
                    for k, v in earlier["shutdown"].items()}
        configs = list(dict.fromkeys(k[:3] for k in shutdown))
    if "waits_for" in sections:
        log("2. shutdown_waits_for")
        waits = bench_waits_for(args.runs, args.calls, log)
        profiles = profile_waits_for(args.profile_calls, log)
    else:
        waits = {tuple(k.split("/")): v for k, v in earlier["shutdown_waits_for_us"].items()}
        profiles = earlier["shutdown_waits_for_profile"]
    if "import" in sections:
        log("3. import and start-up")
        imports = bench_import(max(args.runs * 8, 3), log)
        startups = bench_startup(max(args.runs * 8, 3), log)
    else:
        imports, startups = earlier["import_s"], earlier["startup_s"]
    command = "make bench" if not args.smoke else "python bench/run.py --smoke"
    text = report(args, facts, shutdown, configs, waits, profiles, imports, startups,
                  command) + systemd_section()
    log("")
    log(text)
    if not args.smoke:
        with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
            f.write(text)
        plot(shutdown, configs, os.path.join(args.out, "shutdown.png"))
        raw = {"machine": facts,
               "shutdown": {"/".join(map(str, k)): v for k, v in shutdown.items()},
               "shutdown_waits_for_us": {"/".join(k): v for k, v in waits.items()},
               "shutdown_waits_for_profile": profiles,
               "import_s": imports, "startup_s": startups}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(raw, f, indent=1)
        log(f"wrote {args.out}/RESULTS.md, results.json (every sample) and shutdown.png")
    else:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            plot(shutdown, configs, os.path.join(tmp, "shutdown.png"))
    log(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
