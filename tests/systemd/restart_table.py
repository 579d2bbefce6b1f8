"""The figures of the restarts under load (make test-systemd writes them,
one JSON line per unit) as the Markdown table the systemd guide shows.

    python tests/systemd/restart_table.py build/systemd/restarts.jsonl
"""
import json
import sys

LABELS = {"aiorun-web.service": "socket activation (aiorun-web.service)",
          "aiorun-web-bound.service": "the app binds its port (aiorun-web-bound.service)",
          "aiorun-reload.service (20 reloads)": "20 reloads (aiorun-reload.service)",
          "aiorun-aiohttp.service": "aiohttp, socket activation (aiorun-aiohttp.service)",
          "aiorun-aiohttp-bound.service":
              "aiohttp binding its port (aiorun-aiohttp-bound.service)",
          "aiorun-aiohttp.service (20 reloads)": "aiohttp, 20 reloads (aiorun-aiohttp.service)"}


def table(rows):
    lines = ["| | requests | succeeded | refused | reset | no response | timed out "
             "| longest time without a success |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = LABELS.get(r["unit"], r["unit"])
        if r["restarts"]:
            label += f", {r['restarts']} restarts"
        lines.append(f"| {label} "
                     f"| {r['attempts']:,} | {r['ok']:,} | {r['refused']:,} | {r['reset']:,} "
                     f"| {r['no_response']:,} | {r['timeout']:,} | {r['longest_gap_ms']:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table([json.loads(line) for line in f if line.strip()]))
