"""The drain behind a real load balancer: haproxy (Debian's) in front of two
instances of tests/haproxy/app.py (aiohttp under aiorun), checking each one's
/readyz every 500 ms.  A steady load goes through haproxy; one instance gets
SIGTERM.  With drain_delay=2 its /readyz turns 503 at once, haproxy takes it
out, and it stops accepting only 2 s later; with drain_delay=0 (the baseline)
it stops accepting at once, while haproxy still sends it requests until its
next check.  Counts every response that is not a 200 and every connection
error the clients see, for both runs.

    python tests/haproxy/drain.py [--write bench/haproxy.md] [--seconds 4]

Exits 1 unless the drained run has no failure and the baseline has some
(without them the comparison would prove nothing)."""
import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = 8
CHECK_INTER_MS = 500

CONFIG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 3
    option http-server-close
frontend web
    bind 127.0.0.1:{front}
    default_backend apps
backend apps
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {inter}ms fall 1 rise 1
    server a 127.0.0.1:{a_http} check port {a_health}
    server b 127.0.0.1:{b_http} check port {b_health}
"""


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_app(name, http_port, health_port, drain):
    p = subprocess.Popen([sys.executable, str(HERE / "app.py"), name, str(http_port),
                          str(health_port), str(drain)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "SERVING":
        p.kill()
        raise SystemExit(f"app {name} did not start: {line!r} {p.stderr.read()}")
    return p


def fetch(conn):
    conn.request("GET", "/")
    r = conn.getresponse()
    body = r.read()
    return r.status, body.decode().strip()


class Load:
    """CLIENTS threads, each sending GET / through haproxy back to back on a
    keep-alive connection (a new one after any error)."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses = Counter()
        self.errors = Counter()
        self.served_by = Counter()
        self.latencies = []
        self.threads = [threading.Thread(target=self.client) for _ in range(CLIENTS)]

    def client(self):
        conn = None
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            t0 = time.perf_counter()
            try:
                status, body = fetch(conn)
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.errors[type(e).__name__] += 1
                conn.close()
                conn = None
                continue
            dt = time.perf_counter() - t0
            with self.lock:
                self.statuses[status] += 1
                self.latencies.append(dt)
                if status == 200:
                    self.served_by[body] += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def wait_until(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out: {what}")


def both_serve(front):
    seen = set()
    for _ in range(20):
        try:
            c = http.client.HTTPConnection("127.0.0.1", front, timeout=2)
            status, body = fetch(c)
            c.close()
        except OSError:
            return False
        if status == 200:
            seen.add(body)
    return seen == {"a", "b"}


def one_run(drain, seconds, workdir):
    front, a_http, a_health, b_http, b_health = free_ports(5)
    a = start_app("a", a_http, a_health, drain)
    b = start_app("b", b_http, b_health, drain)
    cfg = Path(workdir) / f"haproxy-{drain}.cfg"
    cfg.write_text(CONFIG.format(front=front, a_http=a_http, a_health=a_health,
                                 b_http=b_http, b_health=b_health, inter=CHECK_INTER_MS))
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: both_serve(front), "haproxy sends to both instances")
        with Load(front) as load:
            time.sleep(seconds)
            t_term = time.monotonic()
            a.send_signal(signal.SIGTERM)
            a_rc = a.wait(timeout=60)
            a_took = time.monotonic() - t_term
            time.sleep(seconds)
        b.send_signal(signal.SIGTERM)
        b_rc = b.wait(timeout=60)
    finally:
        for p in (a, b, haproxy):
            if p.poll() is None:
                p.kill()
            p.wait()
    if a_rc != 0 or b_rc != 0:
        raise SystemExit(f"an instance failed: a={a_rc} {a.stderr.read()} b={b_rc}")
    ok = load.statuses[200]
    failed = sum(n for s, n in load.statuses.items() if s != 200)
    errors = sum(load.errors.values())
    lat = sorted(load.latencies)
    return {
        "drain": drain, "requests": ok + failed + errors, "ok": ok,
        "non_200": failed, "statuses": dict(load.statuses), "errors": dict(load.errors),
        "by_a": load.served_by["a"], "by_b": load.served_by["b"], "a_took": a_took,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
    }


def describe(r):
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    return (f"| `drain_delay={r['drain']:g}` | {r['requests']:,} | {r['non_200']:,}"
            f"{' ' + str(bad) if bad else ''} | {sum(r['errors'].values()):,}"
            f"{' ' + str(r['errors']) if r['errors'] else ''} | {r['by_a']:,} / "
            f"{r['by_b']:,} | {r['a_took']:.1f} s | {r['p50_ms']:.1f} / "
            f"{r['p99_ms']:.1f} ms |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="write the table to this Markdown file")
    ap.add_argument("--seconds", type=float, default=4,
                    help="load before the SIGTERM and after the instance is gone")
    args = ap.parse_args()
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    version = subprocess.run(["haproxy", "-v"], capture_output=True,
                             text=True).stdout.split("\n")[0]
    with tempfile.TemporaryDirectory() as workdir:
        runs = [one_run(2, args.seconds, workdir), one_run(0, args.seconds, workdir)]
    drained, baseline = runs
    table = [
        f"{version.split(' - ')[0]}, checks `GET /readyz` every {CHECK_INTER_MS} ms "
        f"(`fall 1 rise 1`), {CLIENTS} clients sending `GET /` back to back through "
        f"it for {args.seconds:g} s, SIGTERM to instance a, {args.seconds:g} s more; "
        f"Python {sys.version.split()[0]}, `python tests/haproxy/drain.py` "
        f"(`make test-haproxy`).",
        "",
        "| instance a run with | requests | not 200 | connection errors | served by a / b "
        "| a exited after | latency p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        describe(drained),
        describe(baseline),
    ]
    text = "\n".join(table) + "\n"
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    failures_drained = drained["non_200"] + sum(drained["errors"].values())
    failures_baseline = baseline["non_200"] + sum(baseline["errors"].values())
    if failures_drained:
        raise SystemExit(f"the drained run had {failures_drained} failures")
    if not failures_baseline:
        raise SystemExit("the baseline had no failure: the comparison proves nothing")
    print("ok: the drained run lost nothing; the baseline lost "
          f"{failures_baseline}")


if __name__ == "__main__":
    main()
