"""The health endpoint measured (run(health=...)), with bench/health_app.py:

1. Probe latency under load: 4 clients keep the app busy while a prober
   asks /livez and /readyz 50 times a second; p50, p99 and max.
2. A call that holds the GIL for 10 s (ctypes.PyDLL's usleep), then
   time.sleep(10), on the loop, with liveness_timeout=2: every /livez
   answered during them, how fast (must be within 50 ms), and what it said.
3. Abuse: while the endpoint takes garbage, oversized headers, a slowloris
   and 10,000 connections, a client times the app's own requests.  The
   baseline is the same app without the endpoint, the same abuse going to
   another process's endpoint, so the machine carries the same load; the
   two alternate, and the app's median latency must stay within 10 %.  The
   app's memory (VmRSS) before and after the abuse, too.

    python bench/health.py [--write bench/health.md] [--rounds N]

A measurement, not a unit test: the machine's load shows in it."""
import argparse
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE / "health_app.py"
PROBE_LIMIT_MS = 50
LATENCY_LIMIT = 1.10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, health):
        self.port = free_port()
        self.health_port = free_port() if health else None
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), str(self.port),
             f"127.0.0.1:{self.health_port}" if health else "off"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        self.expect("SERVING")

    def expect(self, word):
        line = self.proc.stdout.readline().strip()
        if line != word:
            self.stop()
            raise SystemExit(f"expected {word!r} from the app, got {line!r}")

    def command(self, word, answer):
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        self.expect(answer)

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()   # its reader thread ends: the executor can shut down
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def probe(port, path="/livez"):
    """(milliseconds, status, body) of one GET."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    ms = (time.perf_counter() - t0) * 1000
    head, _, body = data.partition(b"\r\n\r\n")
    return ms, int(head.split()[1]), body.decode().strip()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def ping_loop(port, stop, latencies=None):
    """Sequential "ping" requests on one connection until stop is set."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        while not stop.is_set():
            t0 = time.perf_counter()
            s.sendall(b"ping\n")
            f.readline()
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)


def section_load(seconds):
    app = App(health=True)
    stop = threading.Event()
    clients = [threading.Thread(target=ping_loop, args=(app.port, stop)) for _ in range(4)]
    for t in clients:
        t.start()
    results = {"/livez": [], "/readyz": []}
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for path, store in results.items():
                ms, status, _ = probe(app.health_port, path)
                if status != 200:
                    raise SystemExit(f"{path} answered {status} under load")
                store.append(ms)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in clients:
            t.join()
        app.stop()
    return results


def section_stalls():
    app = App(health=True)
    out = {}
    try:
        for command, name in (("hold", "a C call holding the GIL 10 s"),
                              ("sleep", "time.sleep(10) on the loop")):
            app.proc.stdin.write(command + "\n")
            app.proc.stdin.flush()
            app.expect("HOLDING" if command == "hold" else "SLEEPING")
            t0 = time.monotonic()
            answers = []
            # Read "DONE" in a thread, so the probes stop when the call ends.
            done = threading.Event()
            reader = threading.Thread(target=lambda: (app.expect("DONE"), done.set()))
            reader.start()
            while not done.is_set():
                ms, status, body = probe(app.health_port)
                answers.append((time.monotonic() - t0, ms, status, body))
                time.sleep(0.1)
            reader.join()
            first_503 = next((a for a in answers if a[2] == 503), None)
            last = [a for a in answers if a[2] == 503][-1] if first_503 else None
            out[name] = {
                "probes": len(answers),
                "max_ms": max(a[1] for a in answers),
                "p50_ms": statistics.median(a[1] for a in answers),
                "first_503_s": first_503[0] if first_503 else None,
                "said": last[3] if last else None,
            }
            time.sleep(0.5)   # the loop beats again
            ms, status, _ = probe(app.health_port)
            out[name]["after"] = status
    finally:
        app.stop()
    return out


class Attack:
    """Garbage, oversized headers, a slowloris and 10,000 connections, at a
    steady pace, against one endpoint."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.counts = {"connections": 0, "garbage": 0, "oversized": 0, "refused": 0}
        self.threads = [threading.Thread(target=f) for f in
                        (self.flood, self.junk, self.slowloris)]

    def connect(self):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        except OSError:
            self.counts["refused"] += 1
        return s

    def flood(self):
        """10,000 connections opened (10,000 a second) and held."""
        held = []
        try:
            while len(held) < 10_000 and not self.stop.is_set():
                for _ in range(500):
                    held.append(self.connect())
                self.counts["connections"] = len(held)
                time.sleep(0.05)
            self.stop.wait()
        finally:
            for s in held:
                s.close()

    def junk(self):
        rnd = random.Random(7)
        while not self.stop.is_set():
            for kind in ("garbage", "oversized"):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                        if kind == "garbage":
                            s.sendall(bytes(rnd.getrandbits(8) for _ in range(300))
                                      + b"\r\n\r\n")
                        else:
                            s.sendall(b"GET /livez HTTP/1.1\r\nX: " + b"a" * 16384)
                        s.recv(100)
                except OSError:
                    pass
                self.counts[kind] += 1
            time.sleep(0.01)

    def slowloris(self):
        """100 connections that send a header byte a second, never ending."""
        socks = []
        while not self.stop.is_set():
            socks = [s for s in socks if s.fileno() >= 0]
            while len(socks) < 100:
                s = self.connect()
                socks.append(s)
            for s in socks:
                try:
                    s.send(b"X")
                except OSError:
                    s.close()
            self.stop.wait(1)
        for s in socks:
            s.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def one_abuse_round(probed, seconds):
    """The measured app's request latencies while the abuse runs against
    its own endpoint (probed) or a decoy process's (baseline)."""
    app = App(health=probed)
    decoy = None if probed else App(health=True)
    target = app.health_port if probed else decoy.health_port
    latencies = []
    stop = threading.Event()
    try:
        rss_before = app.rss_kib()
        with Attack(target) as attack:
            time.sleep(1.5)   # the flood is in
            client = threading.Thread(target=ping_loop, args=(app.port, stop, latencies))
            client.start()
            time.sleep(seconds)
            stop.set()
            client.join()
            ms, status, _ = probe(target)   # still answering, under it all
            counts = dict(attack.counts)
        rss_after = app.rss_kib()
    finally:
        app.stop()
        if decoy:
            decoy.stop()
    return {"median_us": statistics.median(latencies) * 1e6,
            "p99_us": pct(latencies, 0.99) * 1e6, "requests": len(latencies),
            "rss_growth_kib": rss_after - rss_before, "probe_during": (ms, status),
            "counts": counts}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))

    lines = [f"`python bench/health.py` (`make bench-health`), Python "
             f"{sys.version.split()[0]}, {os.cpu_count()} CPUs.", ""]
    failures = []

    load = section_load(args.seconds)
    lines += ["**Probe latency under load** (4 clients keeping the app busy; "
              f"a probe every 20 ms for {args.seconds:g} s):", "",
              "| probe | answers | p50 | p99 | max |", "|---|---:|---:|---:|---:|"]
    for path, ms in load.items():
        lines.append(f"| `{path}` | {len(ms)} | {statistics.median(ms):.2f} ms | "
                     f"{pct(ms, 0.99):.2f} ms | {max(ms):.2f} ms |")

    stalls = section_stalls()
    lines += ["", "**While the loop cannot run** (`liveness_timeout=2`, a probe every "
              "100 ms):", "",
              "| the loop's thread is in | probes | slowest answer | first 503 after "
              "| /livez said | after it |", "|---|---:|---:|---:|---|---:|"]
    for name, r in stalls.items():
        lines.append(f"| {name} | {r['probes']} | {r['max_ms']:.1f} ms | "
                     f"{r['first_503_s']:.1f} s | {r['said']} | {r['after']} |"
                     if r["first_503_s"] is not None else f"| {name} | no 503 |")
        if r["max_ms"] > PROBE_LIMIT_MS:
            failures.append(f"{name}: a probe took {r['max_ms']:.1f} ms")
        if r["said"] is None or r["after"] != 200:
            failures.append(f"{name}: {r}")
    if "GIL" not in (stalls["a C call holding the GIL 10 s"]["said"] or ""):
        failures.append("the held GIL was not named")

    rounds = {True: [], False: []}
    for _ in range(args.rounds):
        for probed in (False, True):
            rounds[probed].append(one_abuse_round(probed, args.seconds))
    base = statistics.median(r["median_us"] for r in rounds[False])
    abused = statistics.median(r["median_us"] for r in rounds[True])
    ratio = abused / base
    worst_rss = max(r["rss_growth_kib"] for r in rounds[True])
    c = rounds[True][-1]["counts"]
    lines += ["", f"**The app's own latency while the endpoint is abused** "
              f"({args.rounds} rounds each, alternating; {c['connections']:,} connections "
              f"held, {c['garbage']:,} garbage and {c['oversized']:,} oversized "
              f"requests, 100 slowloris connections per round):", "",
              "| the abuse goes to | app requests (median of rounds) | app median "
              "latency | p99 | app VmRSS growth |", "|---|---:|---:|---:|---:|"]
    for probed, label in ((False, "another process's endpoint (baseline, app "
                                  "without one)"), (True, "the app's own endpoint")):
        rs = rounds[probed]
        lines.append(f"| {label} | {statistics.median(r['requests'] for r in rs):,.0f} | "
                     f"{statistics.median(r['median_us'] for r in rs):.1f} µs | "
                     f"{statistics.median(r['p99_us'] for r in rs):.1f} µs | "
                     f"{max(r['rss_growth_kib'] for r in rs):+,} KiB |")
    lines += ["", f"Ratio of the medians: **{ratio:.3f}** (limit {LATENCY_LIMIT}); the "
              f"endpoint answered {rounds[True][-1]['probe_during'][1]} in "
              f"{rounds[True][-1]['probe_during'][0]:.1f} ms at the end of the abuse."]
    if ratio > LATENCY_LIMIT:
        failures.append(f"the app's latency ratio {ratio:.3f} > {LATENCY_LIMIT}")
    if worst_rss > 8 * 1024:
        failures.append(f"the app's memory grew by {worst_rss} KiB")
    if any(r["probe_during"][1] != 200 for r in rounds[True]):
        failures.append("the endpoint did not answer 200 under abuse")

    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    main()
