"""Where a pipeline run's time goes.

With $RANKBIAS_TIMING set to a file (the workflow sets results/logs/timing.jsonl),
every `rankbias` command appends one JSON line when it ends: the command and its
target, when it started, its process's start-up (interpreter and imports, torch's
among them) and run time, and the phases the command reported (training steps,
spectra and evaluation). `rankbias timing` adds them up per kind of job and sets the
sum against the run's wall time on its cores; what the jobs do not account for is
Snakemake's own parsing and scheduling and cores left idle.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ENV = "RANKBIAS_TIMING"
DEFAULT_LOG = "results/logs/timing.jsonl"
PHASES: dict[str, float] = {}


def add(phase: str, seconds: float) -> None:
    """Count `seconds` towards `phase` of this process's command."""
    PHASES[phase] = PHASES.get(phase, 0.0) + seconds


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def record(command: str, target: str, startup_s: float | None, run_s: float, rc: int) -> None:
    """Append this command's line to $RANKBIAS_TIMING (nothing when it is unset).
    One short write in append mode: concurrent jobs do not interleave lines."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"command": command, "target": target, "end": round(time.time(), 3),
                       "startup_s": None if startup_s is None else round(startup_s, 3),
                       "run_s": round(run_s, 3), "rc": rc,
                       "phases": {k: round(v, 3) for k, v in PHASES.items()}}) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line)


def read(path: str | Path, since: float = 0.0) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no timing log (set ${ENV} or run the workflow)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["end"] >= since]


@dataclass
class _CommandTotals:
    """One kind of command's jobs added up."""
    jobs: int = 0
    startup_s: float = 0.0
    run_s: float = 0.0
    phases: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


def summarise(rows: list[dict], wall_s: float | None = None, cores: int = 1) -> str:
    """A table: per command, jobs, start-up, run time and phases, in core-seconds."""
    by: defaultdict[str, _CommandTotals] = defaultdict(_CommandTotals)
    for r in rows:
        b = by[r["command"]]
        b.jobs += 1
        b.startup_s += r["startup_s"] or 0.0
        b.run_s += r["run_s"]
        for k, v in r["phases"].items():
            b.phases[k] += v
    total = sum(b.startup_s + b.run_s for b in by.values())
    lines = [f"{'job':<10} {'jobs':>5} {'start-up s':>11} {'run s':>9}  phases (s)"]
    for cmd, b in sorted(by.items(), key=lambda kv: -(kv[1].startup_s + kv[1].run_s)):
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(b.phases.items()))
        lines.append(f"{cmd:<10} {b.jobs:>5} {b.startup_s:>11.1f} {b.run_s:>9.1f}  {phases}")
    lines.append(f"{'all jobs':<10} {sum(b.jobs for b in by.values()):>5} "
                 f"{sum(b.startup_s for b in by.values()):>11.1f} "
                 f"{sum(b.run_s for b in by.values()):>9.1f}  total {total:.1f} core-s")
    if wall_s is not None:
        outside = wall_s * cores - total
        lines.append(f"wall {wall_s:.1f} s on {cores} core(s) = {wall_s * cores:.1f} core-s; "
                     f"outside the jobs (Snakemake parsing and scheduling, idle cores): {outside:.1f} core-s")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("timing", help="where a pipeline run's time went")
    p.add_argument("--log", default=os.environ.get(ENV, DEFAULT_LOG),
                   help=f"timing log (default: ${ENV}, else {DEFAULT_LOG})")
    p.add_argument("--since", type=float, default=0.0,
                   help="only jobs that ended after this Unix time; also sets the wall time")
    p.add_argument("--cores", type=int, default=1, help="cores the run had (default 1)")
    p.set_defaults(func=_cmd_timing)


def _cmd_timing(args: argparse.Namespace) -> int:
    rows = read(args.log, args.since)
    wall = time.time() - args.since if args.since else None
    print(f"time per kind of job ({len(rows)} jobs, {args.log}):")
    print(summarise(rows, wall, args.cores))
    return 0
