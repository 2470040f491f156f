"""`make bench`: run the benchmark scenarios, print a table, write JSON.

Usage: python -m bench [--scenarios engine,overhead,stall,e2e,relay,many,soak,scale,autoscale]
                       [--out bench/results/bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil

SCENARIOS = ("engine", "overhead", "stall", "e2e", "relay", "many", "soak", "scale",
             "autoscale")


def _run(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if name == "engine":
        from bench.engine_bench import run_engine_bench

        rows = run_engine_bench(model=args.model, new_tokens=args.new_tokens)
        return [{"scenario": "engine", **row} for row in rows]
    if name == "overhead":
        from bench.overhead import run_overhead_bench

        return run_overhead_bench(new_tokens=args.new_tokens)
    if name == "stall":
        from bench.stall import run_stall_bench

        return run_stall_bench(model=args.model)
    if name == "e2e":
        from bench.e2e import run_e2e_bench

        return run_e2e_bench(model=args.model, new_tokens=args.new_tokens)
    if name == "relay":
        from bench.relay import run_relay_bench

        return run_relay_bench()
    if name == "many":
        from bench.relay import run_many_streams_bench

        return run_many_streams_bench()
    if name == "soak":
        from bench.soak import run_soak_bench

        return run_soak_bench(seconds=args.soak_seconds)
    if name == "scale":
        from bench.redis_scale import run_scale_bench

        return run_scale_bench()
    if name == "autoscale":
        from bench.autoscale import run_autoscale_bench

        return run_autoscale_bench(peak=args.autoscale_peak)
    raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain table with the union of the rows' columns."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k != "first_error"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/bench.json")
    parser.add_argument("--soak-seconds", type=float, default=300,
                        help="how long the soak scenario runs")
    parser.add_argument("--autoscale-peak", type=int, default=100,
                        help="concurrent streams at the top of the autoscale scenario's ramp")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        # The machine's load (1, 5, 15 min) before and after: figures from a busy machine are
        # lower, and a report must say which they are (docs/performance.md).
        "load_avg": {"before": os.getloadavg()},
        "scenarios": {},
    }
    for name in args.scenarios.split(","):
        rows = _run(name.strip(), args)
        report["scenarios"][name] = rows
        print(f"\n== {name} ==\n{format_rows(rows)}", flush=True)
    report["load_avg"]["after"] = os.getloadavg()
    print(f"\nload average (1/5/15 min): before {report['load_avg']['before']}, "
          f"after {report['load_avg']['after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
