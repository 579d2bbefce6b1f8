"""Where the cost of `await shutdown_waits_for(coro)` above `await
loop.create_task(coro)` goes, counted in instructions by callgrind, which
a shared machine cannot disturb: bench/waits_for.py runs each way alone,
once with no calls and once with CALLS, and the difference per call is
split by the object file that executed it, then by function.

    python bench/waits_for_profile.py [--calls 2000] [--loop asyncio|uvloop]

Prints a JSON object (bench/run.py puts it in RESULTS.md):
  {"loop": ..., "task": instructions per call, "waits_for": ...,
   "by_object": {object: extra per call}, "top": [[function, extra], ...],
   "one_future": what making and freeing one asyncio.Future costs}
Needs valgrind (callgrind_annotate); exits with 3 if it is missing.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = 1   # waits_for.py then makes a warm-up round and one timed round


def self_costs(path):
    """{function (with its object file): instructions executed in it}."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)", line)
        if (m and "=>" not in line and "PROGRAM TOTALS" not in line
                and "events annotated" not in line):
            name = re.sub(r"^\S*/", "", m.group(2).strip())   # the file, without its path
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def total(path):
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def profile(way, calls, loop, tmp):
    """Per-call self costs of `way` (calls vs none), and the per-call total."""
    runs = {}
    for n in (0, calls):
        out = os.path.join(tmp, f"{way}.{n}")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, os.path.join(HERE, "waits_for.py"), str(n), way,
                        "--loop", loop, "--rounds", str(ROUNDS)],
                       check=True, capture_output=True)
        runs[n] = out
    per_call = calls * (ROUNDS + 1)
    with_calls, without = self_costs(runs[calls]), self_costs(runs[0])
    costs = {k: (with_calls.get(k, 0) - without.get(k, 0)) / per_call
             for k in set(with_calls) | set(without)}
    return costs, (total(runs[calls]) - total(runs[0])) / per_call


def object_of(function):
    m = re.search(r"\[([^\]]*)\]$", function)
    if not m:
        return "inlined header code (several objects)"
    name = os.path.basename(m.group(1))
    if name.startswith("_aiorun"):
        return "_aiorun (ours)"
    if name.startswith("_asyncio"):
        return "_asyncio (asyncio's C)"
    if name.startswith("libpython") or name.startswith("python"):
        return "CPython core (libpython)"
    if name.startswith("ld-linux"):
        return "ld.so (__tls_get_addr: thread state in a shared libpython)"
    if "uvloop" in m.group(1):
        return "uvloop"
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_annotate"):
        print("valgrind is not installed", file=sys.stderr)
        sys.exit(3)
    with tempfile.TemporaryDirectory() as tmp:
        task, task_total = profile("task", args.calls, args.loop, tmp)
        ours, ours_total = profile("waits_for", args.calls, args.loop, tmp)
        future_total = profile("future", args.calls, args.loop, tmp)[1]
        noop_total = profile("noop", args.calls, args.loop, tmp)[1]
    extra = {k: ours.get(k, 0) - task.get(k, 0) for k in set(ours) | set(task)}
    by_object = {}
    for function, cost in extra.items():
        by_object[object_of(function)] = by_object.get(object_of(function), 0) + cost
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:15]
    by_object = {k: v for k, v in by_object.items() if abs(v) >= 1}
    print(json.dumps({"loop": args.loop, "calls": args.calls, "task": task_total,
                      "waits_for": ours_total, "by_object": by_object,
                      "one_future": future_total - noop_total,
                      "top": [[re.sub(r" \[.*\]$", "", k), v] for k, v in top]}))


if __name__ == "__main__":
    main()
