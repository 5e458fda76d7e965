"""Progress on the terminal while the workflow trains (no torch: the workflow's parse
imports this module).

A training job writes every epoch's line to its log (results/logs/train/<pack>.log) and,
through `--progress-fd`, a rate-limited copy to the terminal Snakemake runs in:
``PackProgress`` prints a pack's line (pack, epoch, loss, mean rank, ETA) at most every
``min_interval`` seconds, the first and the last always, and a heartbeat thread repeats
the latest one, its ETA counted down, whenever ``max_silence`` seconds pass without a
line (an epoch longer than that). So a running pack is heard from at least every
``max_silence`` seconds.

The whole run's estimate: when the workflow starts (its ``onstart``), ``run_plan``
takes the cost model's seconds (``rankbias.plan.cluster.estimate_seconds``) of every pack it
will train and ``start_line`` prints the total; ``write_plan`` stores the plan in a file
(``RUN_PLAN``, results/logs/run-plan.json), which each training job's command names
(`rankbias train --run-plan FILE`), and each job, when its pack is done, prints
``finished_line``: the packs done, the time so far and what is left, the cost model's
seconds of the packs left at the pace the run has kept (wall time so far over the cost
model's seconds of the packs done).
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# The file holding the run's plan (run_plan()) for its training jobs: the workflow's
# onstart writes it, each train rule's command names it (--run-plan).
RUN_PLAN = "results/logs/run-plan.json"
MIN_INTERVAL = 10.0
MAX_SILENCE = 25.0


def duration(seconds: float) -> str:
    """'45s', '3m05s', '2h04m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PackProgress:
    """A pack's progress lines on `stream` (see the module's docstring). `clock` is
    injectable for tests; the heartbeat thread runs between start() and stop()."""

    def __init__(self, stream: IO[str], pack: str, epochs: int, min_interval: float = MIN_INTERVAL,
                 max_silence: float = MAX_SILENCE, clock: Callable[[], float] = time.monotonic):
        self.stream, self.pack, self.epochs = stream, pack, epochs
        self.min_interval, self.max_silence, self.clock = min_interval, max_silence, clock
        self.lock = threading.Lock()
        self.last_emit: float | None = None
        self.state: tuple[int, float | None, float | None, float, float] | None = None
        self.next_epoch = 1         # the epoch a pack resumed from a checkpoint starts with
        self.activity: str | None = None    # what runs before the first epoch (see `during`)
        self.said_at: float | None = None
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def line(self, epoch: int, loss: float | None, rank: float | None, eta: float,
             running_for: float | None = None) -> str:
        loss_s = f"loss {loss:.4f}" if loss is not None else "loss -"
        rank_s = f"mean rank {rank:.1f}" if rank is not None else "mean rank -"
        head = f"[pack {self.pack}] epoch {epoch}/{self.epochs} {loss_s} {rank_s}"
        if running_for is None:
            return f"{head} ETA {duration(eta)}"
        return (f"{head} ETA {duration(eta)} (epoch {min(epoch + 1, self.epochs)} running "
                f"for {duration(running_for)})")

    def _write(self, text: str, now: float) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass    # the terminal went away: progress is a courtesy, training goes on
        self.last_emit = now

    def epoch(self, epoch: int, loss: float | None, rank: float | None, eta: float) -> bool:
        """Record epoch `epoch`'s result; print it if it is the first or the last epoch or
        `min_interval` has passed since the last line. Returns whether it printed."""
        now = self.clock()
        with self.lock:
            due = (self.state is None or self.last_emit is None or epoch >= self.epochs
                   or now - self.last_emit >= self.min_interval)
            self.state = (epoch, loss, rank, eta, now)
            if due:
                self._write(self.line(epoch, loss, rank, eta), now)
            return due

    def say(self, text: str) -> None:
        """A line of its own (start, done), printed at once."""
        with self.lock:
            now = self.clock()
            self._write(text, now)
            if self.said_at is None:
                self.said_at = now

    def beat(self) -> bool:
        """Repeat the latest state, its ETA counted down, if `max_silence` has passed
        without a line. Returns whether it printed."""
        now = self.clock()
        with self.lock:
            if self.last_emit is None or now - self.last_emit < self.max_silence:
                return False
            if self.state is None:      # the first epoch (or what comes before it) still running
                since = now - (self.said_at if self.said_at is not None else self.last_emit)
                what = self.activity or f"epoch {self.next_epoch}/{self.epochs}"
                self._write(f"[pack {self.pack}] {what} running for {duration(since)}", now)
                return True
            epoch, loss, rank, eta, at = self.state
            self._write(self.line(epoch, loss, rank, max(0.0, eta - (now - at)), now - at), now)
            return True

    @contextmanager
    def during(self, activity: str) -> Iterator[None]:
        """Name what runs before the first epoch (the fresh network's measurements, minutes
        for a wide pack on a CPU) in the heartbeat's lines, from a clock started now."""
        with self.lock:
            self.activity, self.said_at = activity, self.clock()
        try:
            yield
        finally:
            with self.lock:
                self.activity, self.said_at = None, self.clock()

    def start(self) -> PackProgress:
        def loop() -> None:
            period = min(self.max_silence, self.min_interval) / 2
            while not self.stop_event.wait(period):
                self.beat()
        self.thread = threading.Thread(target=loop, name=f"progress-{self.pack}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join()


# -- the whole run ---------------------------------------------------------------------

def run_plan(packs: Mapping[str, tuple[list[str], float]], slots: int, runs_dir: str | Path) -> dict:
    """The run's plan for `finished_line`: every pack still to train ({pack_id: (its run_ids,
    cost-model seconds)}, those whose last run.json is missing under `runs_dir`), the
    number of packs that train at once (`slots`) and the start time."""
    todo = {pid: {"last_run": ids[-1], "estimate_s": round(float(est), 1)}
            for pid, (ids, est) in packs.items()
            if ids and not (Path(runs_dir) / ids[-1] / "run.json").exists()}
    return {"packs": todo, "slots": max(1, int(slots)), "started": time.time(),
            "runs_dir": str(runs_dir)}


def start_line(plan: Mapping) -> str | None:
    packs = plan["packs"]
    if not packs:
        return None
    total = sum(p["estimate_s"] for p in packs.values())
    return (f"[run] {len(packs)} pack(s) to train: about {duration(_wall(total, packs, plan['slots']))} "
            f"with {plan['slots']} at a time (cost model: {duration(total)} of training; "
            f"each pack's progress follows, its full log in results/logs/train/<pack>.log)")


def _wall(seconds: float, packs: Mapping, slots: int) -> float:
    """Wall seconds for `seconds` of training spread over `slots` jobs, at least the
    longest pack's."""
    longest = max((p["estimate_s"] for p in packs.values()), default=0.0)
    return max(seconds / max(1, slots), longest)


def finished(runs_dir: Path, last_run: str) -> bool:
    """Whether a pack is done: its last run's run.json (written last) exists."""
    return (runs_dir / last_run / "run.json").exists()


def finished_line(plan: Mapping, now: float | None = None) -> str | None:
    """After a pack is done: the packs done of the run's, the time so far, and the
    training left: the cost model's seconds of the packs left, at the pace the run has
    kept so far (its wall time over the cost model's seconds of the packs done), which
    takes in job start-up, parallel jobs and how far off the cost model is here."""
    packs = plan.get("packs") or {}
    if not packs:
        return None
    runs_dir = Path(plan.get("runs_dir", "results/runs"))
    left = {pid: p for pid, p in packs.items() if not finished(runs_dir, p["last_run"])}
    done_est = sum(p["estimate_s"] for pid, p in packs.items() if pid not in left)
    elapsed = max(0.0, (now if now is not None else time.time()) - float(plan.get("started", time.time())))
    head = f"[run] {len(packs) - len(left)}/{len(packs)} pack(s) trained, {duration(elapsed)} so far"
    if not left:
        return f"{head}; training done"
    rest = sum(p["estimate_s"] for p in left.values())
    if done_est <= 0:
        return (f"{head}; {len(left)} pack(s) left, about {duration(_wall(rest, left, int(plan.get('slots', 1))))} "
                f"by the cost model")
    pace = elapsed / done_est
    return (f"{head}; about {duration(rest * pace)} of training left ({len(left)} pack(s): the cost "
            f"model's {duration(rest)} at this run's pace, x {pace:.2f})")


def write_plan(plan: Mapping, path: str | Path = RUN_PLAN) -> None:
    """Store the run's plan (run_plan()) for its training jobs: written whole under a
    temporary name, then renamed, so a job never reads half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, sort_keys=True))
    os.replace(tmp, path)


def read_plan(path: str | Path) -> dict | None:
    """The run's plan write_plan() stored in `path`, or None where there is none (a
    training job run outside the workflow) or it is not a plan: the plan only adds the
    whole run's line, so its absence never fails a job."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and isinstance(plan.get("packs"), dict) else None


def open_fd(fd: int) -> IO[str]:
    """A text stream on the open file descriptor `fd` (the rule opens it as the
    terminal's stderr); ValueError naming it otherwise."""
    try:
        os.fstat(fd)
    except OSError:
        raise ValueError(f"--progress-fd {fd}: not an open file descriptor (the workflow's train "
                         f"rule opens it with `{fd}>&2`, the terminal, before sending the rest "
                         f"to the log)") from None
    return os.fdopen(fd, "w", buffering=1, closefd=False)
