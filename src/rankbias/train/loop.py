"""`rankbias train`: train a pack, record every metric, checkpoint, write run outputs.

Robustness of a training job:
  * a lock file, `<out>/../.locks/<pack_id>.lock` (results/.locks/, beside the runs and
    outside every DVC output, git-ignored with results/): a second training of the same
    pack fails at once, naming the process that holds it;
  * checkpoints hold only tensors and plain containers and are read with
    ``torch.load(weights_only=True)``, which cannot run code; the previous checkpoint is
    kept, so a truncated or corrupt one is named and training resumes from the one
    before it (or restarts, saying so);
  * a checkpoint that cannot be written (disk full) is a warning, not the end of the job;
  * SIGTERM (what SLURM sends before it preempts or times out a job) writes a
    checkpoint at the end of the current epoch, the last one included (its runs are then
    left to the rerun), or, while the runs are being written, after the run being written,
    and exits with status 143 (128 + SIGTERM, what a shell reports for a process SIGTERM
    ended), so a requeued job resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import fcntl
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from rankbias.train import data as data_mod
from rankbias.store import metrics as M
from rankbias.train import numerics
from rankbias.core import timing
from rankbias.train.engine import GRAPH_MODES, UPDATE_MODES, Pack, check_pack_memory
from rankbias.train.models import LABEL_NOISE_SEED_OFFSET
from rankbias.train.theory import TheoryRecorder
from rankbias.plan.progress import MAX_SILENCE, PackProgress, duration, finished_line, open_fd, read_plan
from rankbias.core.io import atomic_write_bytes
from rankbias.store.results import write_run
from rankbias.core.pack import PackSpec, load_pack, pack_id
from rankbias.core.spec import RunSpec, SpecError
from rankbias.store import provenance
from rankbias.train.gpus import acquire_gpu

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
# Where the packs' lock files live, beside the runs directory: not in the checkpoint
# directory, which lies in the DVC output results/packs.
LOCKS = ".locks"
# Exit status after a SIGTERM that left a checkpoint behind: 128 + the signal number.
PREEMPTED_EXIT = 128 + signal.SIGTERM
# Divergence besides NaN/inf: an epoch's mean training loss above this multiple of the
# member's loss at initialisation. At initialisation a classifier is near chance (cross
# entropy ~ln 10 = 2.3 for ten classes); ten times that means confidently wrong
# predictions on the data it trains on, which no run that learns passes through, while an
# lr far too large keeps the loss finite in the thousands at chance accuracy. Such a
# member is evidence of nothing and is treated like a NaN one.
BLOWUP_FACTOR = 10.0


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint."""


class PackLocked(RuntimeError):
    """Another process is training the same pack."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device: {device!r} is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(device)


def _nan_if(dead: bool, value) -> float:
    """A diverged run's value is recorded as NaN."""
    return float("nan") if dead else float(value)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class Recorder:
    """Per-member history: metric rows, layer rows, spectra. Plain lists, checkpointable."""

    def __init__(self, pack: Pack, dataset):
        self.pack, self.ds = pack, dataset
        self.metrics: list[list[dict]] = [[] for _ in range(pack.K)]
        self.layers: list[list[dict]] = [[] for _ in range(pack.K)]
        # what spectra are stored of: every matrix, then every convolution's operator
        self.entries = pack.matrices + [(name, "conv_operator") for name, _, _ in pack.operators]
        self.spectra: list[dict[str, list]] = [{m: [] for m, _ in self.entries} for _ in range(pack.K)]
        self.logged_epochs: list[int] = []
        self.diverged: list[dict | None] = [None] * pack.K

    def state(self) -> dict:
        """Plain containers, numbers, strings and tensors only: what
        ``torch.load(weights_only=True)`` reads back (numpy arrays it would refuse)."""
        spectra = [{m: [torch.from_numpy(np.asarray(s)) for s in svs] for m, svs in member.items()}
                   for member in self.spectra]
        return {"metrics": self.metrics, "layers": self.layers, "spectra": spectra,
                "logged_epochs": self.logged_epochs, "diverged": self.diverged}

    def load_state(self, st: dict) -> None:
        for k in ("metrics", "layers", "logged_epochs", "diverged"):
            setattr(self, k, st[k])
        self.spectra = [{m: [s.numpy() for s in svs] for m, svs in member.items()}
                        for member in st["spectra"]]

    @torch.no_grad()
    def record(self, epoch: int, prev: dict[str, torch.Tensor] | None, final: bool) -> dict:
        """Metrics of the state after `epoch` epochs (epoch 0 = initialisation)."""
        pack, K = self.pack, self.pack.K
        step_loss = pack.epoch_loss().cpu().numpy() if epoch > 0 else np.full(K, np.nan)
        # Divergence: a member whose loss or weights went non-finite, or whose loss blew
        # up (BLOWUP_FACTOR), leaves the pack.
        if epoch > 0:
            finite_w = pack.finite().cpu().numpy()
            for k in range(K):
                if self.diverged[k] is None:
                    reason = self.divergence(k, float(step_loss[k]), bool(finite_w[k]))
                    if reason is not None:
                        self.diverged[k] = {"epoch": epoch, "reason": reason}
                        pack.freeze(k)
        dead = np.array([d is not None for d in self.diverged])
        logged = epoch == 0 or final or epoch % pack.specs.log_every == 0

        dist, norms, sv = {}, {}, {}
        for m, _ in pack.matrices:
            w = pack.weight(m)
            norms[m] = torch.linalg.matrix_norm(w.double()).cpu().numpy()
            dist[m] = (M.relative_distance(prev[m], w).cpu().numpy() if prev is not None
                       else np.full(K, np.nan))
            if logged:
                sv[m] = M.singular_values(w).cpu().numpy()
        if logged:
            sv.update({m: s.cpu().numpy() for m, s in pack.operator_spectra().items()})
            tr_loss, tr_acc = (t.cpu().numpy() for t in pack.evaluate(self.ds.x_train, self.ds.y_train))
            te_loss, te_acc = (t.cpu().numpy() for t in pack.evaluate(self.ds.x_test, self.ds.y_test))
            self.logged_epochs.append(epoch)
        else:
            tr_loss = tr_acc = te_loss = te_acc = np.full(K, np.nan)

        mean_ranks = []
        for k, spec in enumerate(pack.specs):
            hidden_ranks = []
            for i, (m, kind) in enumerate(self.entries):
                if logged:
                    s = np.full_like(sv[m][k], np.nan) if dead[k] else sv[m][k]
                    self.spectra[k][m].append(s)
                    if kind in ("hidden", "conv") and not dead[k]:   # kernels: rank.conv's default
                        hidden_ranks.append(int(M.rank(s)))
                if kind == "conv_operator":     # its kernel's row has the distance and norm
                    self.layers[k].append({"epoch": epoch, "layer": m, "index": i, "kind": kind,
                                           "distance": float("nan"), "weight_norm": float("nan")})
                    continue
                self.layers[k].append({"epoch": epoch, "layer": m, "index": i, "kind": kind,
                                       "distance": _nan_if(dead[k], dist[m][k]),
                                       "weight_norm": _nan_if(dead[k], norms[m][k])})
            mean_rank = float(np.mean(hidden_ranks)) if hidden_ranks else float("nan")
            mean_ranks.append(mean_rank)
            self.metrics[k].append({
                "epoch": epoch, "logged": bool(logged),
                "lr": spec.lr_at(epoch - 1) if epoch > 0 else float("nan"),
                "step_loss": _nan_if(dead[k], step_loss[k]),
                "train_loss": _nan_if(dead[k], tr_loss[k]), "train_acc": _nan_if(dead[k], tr_acc[k]),
                "test_loss": _nan_if(dead[k], te_loss[k]), "test_acc": _nan_if(dead[k], te_acc[k]),
                "distance": _nan_if(dead[k], np.mean([dist[m][k] for m, _ in pack.matrices])),
                "mean_rank": mean_rank, "diverged": bool(dead[k]),
            })
        alive = ~dead
        return {"loss": float(np.nanmean(step_loss[alive])) if alive.any() and epoch > 0 else float("nan"),
                "mean_rank": float(np.nanmean(np.array(mean_ranks)[alive])) if logged and alive.any() else None,
                "diverged": int(dead.sum())}

    def divergence(self, k: int, loss: float, finite_weights: bool) -> str | None:
        """Why member `k` counts as diverged after an epoch with mean training loss `loss`,
        or None when it does not."""
        if not np.isfinite(loss):
            return "non-finite training loss"
        if not finite_weights:
            return "non-finite weights"
        initial = self.metrics[k][0]["train_loss"]
        if np.isfinite(initial) and loss > BLOWUP_FACTOR * initial:
            return (f"training loss {loss:.4g} above {BLOWUP_FACTOR:g} times its initial "
                    f"{initial:.4g}")
        return None

    def frames(self, k: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
        spectra = {"epochs": np.array(self.logged_epochs, dtype=np.int64),
                   "layers": np.array([m for m, _ in self.entries])}
        for i, (m, _) in enumerate(self.entries):
            spectra[f"sv_{i}"] = np.stack(self.spectra[k][m]).astype(np.float64)
        return pd.DataFrame(self.metrics[k]), pd.DataFrame(self.layers[k]), spectra


def _save_checkpoint(checkpoint_dir: Path, epoch: int, run_ids: list[str], pack: Pack, rec: Recorder,
                     elapsed: float, theory: TheoryRecorder) -> bool:
    """Write the checkpoint, keeping the one before it as PREVIOUS_CHECKPOINT; whether it
    was written. A write that fails (a full disk) is a warning: training goes on, and a
    kill later resumes from the last checkpoint that was written."""
    path, prev = checkpoint_dir / CHECKPOINT, checkpoint_dir / PREVIOUS_CHECKPOINT
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "run_ids": run_ids, "pack": pack.state(), "recorder": rec.state(),
                "elapsed": elapsed, "theory": theory.state()}, buf)
    try:
        if path.exists():
            os.replace(path, prev)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else e.strerror or type(e).__name__
        _warn(f"warning: {path}: checkpoint at epoch {epoch} not written ({what}: {e}); "
              f"training goes on, a kill now resumes from the last checkpoint written")
        return False
    return True


def _checkpoint_matches(st, pack: Pack) -> bool:
    """Whether `st` has the layout of this pack's checkpoint (keys and tensor shapes)."""
    if not isinstance(st, dict) or not {"epoch", "run_ids", "pack", "recorder", "elapsed", "theory"} <= set(st):
        return False
    want, got = pack.state(), st["pack"]
    if not isinstance(got, dict) or set(got) != set(want):
        return False
    for key in ("params", "running"):
        if set(got[key]) != set(want[key]) or any(
                got[key][n].shape != want[key][n].shape for n in want[key]):
            return False
    return (len(got["bufs"]) == len(want["bufs"])
            and all(a.shape == b.shape for a, b in zip(got["bufs"], want["bufs"]))
            and got["alive"].shape == want["alive"].shape
            and isinstance(st["recorder"], dict) and isinstance(st["epoch"], int))


def load_checkpoint(checkpoint_dir: Path, run_ids: list[str], pack: Pack) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of this pack as (path, state), or None to start
    afresh. An unreadable one is named and deleted, so it never replaces the good one
    kept beside it; a readable one of another pack is an error."""
    for path in (checkpoint_dir / CHECKPOINT, checkpoint_dir / PREVIOUS_CHECKPOINT):
        if not path.exists():
            continue
        try:
            # weights_only: tensors and plain containers only; a pickle that would
            # construct anything else (and so could run code) is refused.
            st = torch.load(path, map_location="cpu", weights_only=True)
            problem = None if _checkpoint_matches(st, pack) else "not a checkpoint of this pack's layout"
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or unsafe: all unusable
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem is None and st["run_ids"] != run_ids:
            raise RuntimeError(f"{path}: checkpoint belongs to another pack "
                               f"(runs {st['run_ids']}); delete it to start afresh")
        if problem is None:
            return path, st
        _warn(f"warning: {path}: unreadable checkpoint ({problem}); deleted")
        path.unlink(missing_ok=True)
    return None


def lock_path(out_dir: str | Path, pid: str) -> Path:
    """The lock file of pack `pid` trained into `out_dir`: `<out_dir>/../.locks/<pid>.lock`
    (results/.locks/ for results/runs). It is kept after training (removing a lock file
    another process may be opening races with it) and lies in no DVC output."""
    return Path(out_dir).parent / LOCKS / f"{pid}.lock"


@contextlib.contextmanager
def pack_lock(path: Path, pid: str):
    """Hold the lock file `path` of pack `pid` for the block; PackLocked, at once, naming
    the holder (pid, host, start time), when another process holds it. The lock is the
    kernel's (flock), so it is released whenever its holder ends, even killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
                who = (f"pid {holder.get('pid')} on host {holder.get('host')}, "
                       f"started {holder.get('started')}")
            except ValueError:
                who = "a process that has not yet written its name"
            raise PackLocked(f"{path}: pack {pid} is already being trained by {who}; "
                             f"wait for it to finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}))
        f.flush()
        yield
    finally:
        f.close()


@contextlib.contextmanager
def sigterm_requested():
    """A flag set by SIGTERM during the block (the handler only sets it, so the training
    step is never interrupted halfway). Outside the main thread signals cannot be caught,
    and the flag stays unset."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_pack(specs: Sequence[RunSpec], out_dir: str | Path, device: str = "auto",
               checkpoint_dir: str | Path | None = None, checkpoint_every: int = 5,
               data_dir: str | Path | None = None, dataset=None, progress: bool = True,
               on_epoch=None, graph: str = "auto", device_memory_mb: int | None = None,
               deterministic: bool = True, terminal=None, update: str = "fused",
               run_plan: dict | None = None) -> list[Path]:
    """Train one pack and write `out_dir/<run_id>/` for each member.

    First, before anything is allocated or locked, the pack's memory estimate must fit
    `device_memory_mb`, else the device's own memory (engine.check_pack_memory).

    Resumes from `checkpoint_dir/checkpoint.pt` when it holds this pack. `on_epoch(epoch)`
    is called after each epoch's checkpoint (tests use it to simulate a kill). `graph`
    (auto|on|off) says whether a CUDA step may be a captured graph (engine.choose_stepper).
    `deterministic` (the config key of that name) runs CUDA under rankbias.train.numerics'
    deterministic policy; the pack's `precision` sets fp32 or TF32. `terminal` (a text
    stream) gets the rate-limited progress lines of rankbias.plan.progress besides the full
    ones on stderr, and, given the whole run's plan (`run_plan`, rankbias.plan.progress.read_plan),
    the whole run's estimate when the pack is done. `update` (fused|torch|columns) is the parameter update (engine.UPDATE_MODES; torch:
    torch.optim.SGD's operation order, bit for bit on the CPU). Raises PackLocked when
    another process trains the pack (`lock_path`), NondeterministicOp naming an op with no
    deterministic kernel, and Preempted after SIGTERM (with a checkpoint written).
    """
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every: must be >= 1, got {checkpoint_every}")
    out_dir = Path(out_dir)
    members = PackSpec.of(specs, f"pack {pack_id(specs)}")
    pid = members.id
    dev = resolve_device(device)
    check_pack_memory(members, dev, device_memory_mb)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "packs" / pid
    with pack_lock(lock_path(out_dir, pid), pid), sigterm_requested() as stop, \
            numerics.policy(deterministic, members.precision, dev.type):
        try:
            return _train_locked(members, out_dir, pid, checkpoint_dir, checkpoint_every, dev,
                                 data_dir, dataset, progress, on_epoch, graph, device_memory_mb, stop,
                                 deterministic, terminal, update, run_plan)
        except RuntimeError as e:
            err = numerics.explain(e, f"pack {pid}")
            if err is e:
                raise
            raise err from e


def _train_locked(specs: PackSpec, out_dir: Path, pid: str, checkpoint_dir: Path, checkpoint_every: int,
                  dev: torch.device, data_dir, dataset, progress: bool, on_epoch, graph: str,
                  device_memory_mb: int | None, stop: threading.Event,
                  deterministic: bool = True, terminal=None, update: str = "fused",
                  run_plan: dict | None = None) -> list[Path]:
    shown = None
    if terminal is not None:
        shown = PackProgress(terminal, pid, specs.epochs)
        shown.start()
    try:
        return _train_epochs(specs, out_dir, pid, checkpoint_dir, checkpoint_every, dev, data_dir,
                             dataset, progress, on_epoch, graph, device_memory_mb, stop,
                             deterministic, shown, update, run_plan)
    finally:
        if shown is not None:
            shown.stop()


def _train_epochs(specs: PackSpec, out_dir: Path, pid: str, checkpoint_dir: Path, checkpoint_every: int,
                  dev: torch.device, data_dir, dataset, progress: bool, on_epoch, graph: str,
                  device_memory_mb: int | None, stop: threading.Event, deterministic: bool,
                  shown: PackProgress | None, update: str = "fused",
                  run_plan: dict | None = None) -> list[Path]:
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)   # graphs, streams and events use the current device
    # A given data_dir is the copy the workflow declared as the job's input: read only it.
    ds = dataset or data_mod.load(specs.dataset, dev, data_dir, specs.train_subset, specs.test_subset,
                                  strict=data_dir is not None)
    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, dev, graph=graph, memory_mb=device_memory_mb,
                update=update)
    rec = Recorder(pack, ds)
    thy = TheoryRecorder(specs, ds.x_train, ds.y_train, ds.num_classes)
    run_ids = specs.run_ids

    start, elapsed0 = 0, 0.0
    had_checkpoint = any((checkpoint_dir / n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT))
    found = load_checkpoint(checkpoint_dir, run_ids, pack)
    if found is not None:
        ckpt_path, st = found
        pack.load_state(st["pack"])
        rec.load_state(st["recorder"])
        thy.load_state(st["theory"])
        start, elapsed0 = st["epoch"], st["elapsed"]
        msg = f"[pack {pid}] resuming from {ckpt_path} at epoch {start}/{specs.epochs}"
        if ckpt_path.name == PREVIOUS_CHECKPOINT:
            _warn(msg + " (the checkpoint before the unreadable one)")
        else:
            _log(progress, msg)
    elif had_checkpoint:
        _warn(f"[pack {pid}] no readable checkpoint in {checkpoint_dir}; restarting from epoch 0")
    if shown is not None:   # before epoch 0's measurements: minutes for a wide pack on a CPU
        shown.next_epoch = start + 1
        shown.say(f"[pack {pid}] K={pack.K} {specs.model} on {specs.dataset}, {dev.type}: "
                  + (f"resuming at epoch {start}/{specs.epochs}" if start else f"{specs.epochs} epochs"))
    if found is None:
        fresh = "epoch 0 (the fresh network: evaluation, spectra, lemma checks)"
        _log(progress, f"[pack {pid}] {fresh}")
        with shown.during(fresh) if shown is not None else contextlib.nullcontext():
            info = rec.record(0, None, final=specs.epochs == 0)
            _theory(thy, pack, rec, 0, "fresh")
        _log(progress, f"[pack {pid}] K={pack.K} {specs.model} on {specs.dataset} ({pack.n} samples), "
                       f"{dev.type}: epoch 0 mean rank {info['mean_rank']:.1f}")
    t0 = time.perf_counter()
    reached = start       # epochs trained so far

    def preempted(what: str) -> Preempted:
        """SIGTERM: checkpoint the state after `reached` epochs (`what` has been done since)."""
        saved = _save_checkpoint(checkpoint_dir, reached, run_ids, pack, rec,
                                 elapsed0 + time.perf_counter() - t0, thy)
        return Preempted(f"[pack {pid}] SIGTERM{what}: " + (
            f"checkpoint of epoch {reached}/{specs.epochs} in {checkpoint_dir}; a rerun resumes from it"
            if saved else f"no checkpoint could be written; a rerun resumes from the last one "
                          f"in {checkpoint_dir}, if any"))

    for epoch in range(start, specs.epochs):
        if all(d is not None for d in rec.diverged):    # resumed where every member had diverged
            break
        prev = {m: pack.weight(m).detach().clone() for m, _ in pack.matrices}
        t_epoch = time.perf_counter()
        pack.train_epoch(epoch)
        t_record = time.perf_counter()
        timing.add("train_steps", t_record - t_epoch)
        if epoch == start:
            _log(progress, f"[pack {pid}] step: {pack.step_mode}, differentiated {pack.differentiation}, update {pack.update}")
        info = rec.record(epoch + 1, prev, final=epoch + 1 == specs.epochs)
        timing.add("spectra_eval", time.perf_counter() - t_record)
        t_theory = time.perf_counter()
        _theory(thy, pack, rec, epoch + 1, "trained" if epoch + 1 == specs.epochs else None)
        timing.add("theory", time.perf_counter() - t_theory)
        done = epoch + 1 - start
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (specs.epochs - epoch - 1)
        rank = f" mean rank {info['mean_rank']:.1f}" if info["mean_rank"] is not None else ""
        div = f" ({info['diverged']} diverged)" if info["diverged"] else ""
        _log(progress, f"[pack {pid}] epoch {epoch + 1}/{specs.epochs} loss {info['loss']:.4f}{rank}{div} "
                       f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s")
        if shown is not None:
            shown.epoch(epoch + 1, info["loss"], info["mean_rank"], eta)
        reached = epoch + 1
        # SIGTERM is honoured in the last epoch too: the runs are not written, the
        # checkpoint of the trained pack is, and the rerun only writes them.
        if stop.is_set():
            raise preempted("")
        if reached % checkpoint_every == 0 and reached != specs.epochs:
            _save_checkpoint(checkpoint_dir, reached, run_ids, pack, rec, elapsed0 + elapsed, thy)
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if info["diverged"] == pack.K:
            _log(progress, f"[pack {pid}] every member diverged; stopping")
            break
    wall = elapsed0 + time.perf_counter() - t0

    # the numerical policy and the device's stack, in the provenance and beside the step
    policy = numerics.describe(deterministic, specs.precision, dev.type, dev)
    env = {**provenance.collect(device=dev.type), "numerics": policy}
    paths = []
    for k, spec in enumerate(specs):
        # A SIGTERM while the runs are written stops between two runs: each run directory
        # holds complete files (run.json last), and the rerun writes them all from the
        # checkpoint of the trained pack.
        if stop.is_set():
            raise preempted(f" after writing {k} of {pack.K} runs")
        metrics, layers, spectra = rec.frames(k)
        run_json = {
            "run_id": spec.run_id, "spec": spec.to_dict(), "model": spec.model, "pack_id": pid,
            "pack_size": pack.K, "status": "complete", "diverged": rec.diverged[k],
            "epochs_completed": int(metrics["epoch"].max()),
            "wall_time_s": round(wall, 3),
            # the whole pack's time measuring the theory (part of wall_time_s after epoch 0)
            "theory_time_s": {part: round(t, 3) for part, t in thy.seconds.items()},
            "device": device_name(dev), "step": pack.step_mode, "differentiation": pack.differentiation,
            "update": pack.update,
            "numerics": policy, "seeds": {"init": f"torch.manual_seed({spec.seed})",
                      "data_order": f"torch.randperm, Generator seed {spec.seed} * 1000003 + epoch + 1",
                      **_label_noise_seed(spec)},
            "dataset": {"name": ds.name, "checksums": ds.checksums, "source": ds.source,
                        "train_size": int(ds.x_train.shape[0]), "test_size": int(ds.x_test.shape[0])},
            "provenance": env, "theory": thy.summary(k),
        }
        write_run(out_dir / spec.run_id, run_json, metrics, layers, spectra, thy.tables(k))
        paths.append(out_dir / spec.run_id)
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (checkpoint_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):     # the emptied checkpoint directory; kept if not empty
        checkpoint_dir.rmdir()
    _log(progress, f"[pack {pid}] done in {wall:.1f}s; measuring the theory took "
                   f"{thy.seconds['theorem1']:.1f}s (Theorem 1) and {thy.seconds['lemmas']:.1f}s (lemmas); "
                   f"wrote {len(paths)} runs to {out_dir}")
    if shown is not None:
        job = (timing.process_age() or 0.0)
        shown.say(f"[pack {pid}] done: {len(paths)} runs, {duration(wall)} of training, "
                  f"{duration(job)} in this job")
        line = finished_line(run_plan) if run_plan is not None and pid in run_plan["packs"] else None
        if line is not None:
            shown.say(line)
            _log(progress, line)
    return paths


def _label_noise_seed(spec: RunSpec) -> dict[str, str]:
    """How a run with label noise draws its labels (models.epoch_labels); nothing without."""
    if not spec.label_noise:
        return {}
    return {"label_noise": f"p = {spec.label_noise:g}: torch.rand < p, then torch.randint(classes), "
                           f"Generator seed {LABEL_NOISE_SEED_OFFSET} + {spec.seed} * 1000003 + epoch + 1"}


def _theory(thy: TheoryRecorder, pack: Pack, rec: Recorder, epoch: int, lemma_stage: str | None) -> None:
    """Theorem 1 at a logged epoch, from the spectra just stored, and the lemma checks
    on the fresh (epoch 0) and the trained (last epoch) networks."""
    dead = [d is not None for d in rec.diverged]
    if rec.logged_epochs and rec.logged_epochs[-1] == epoch:
        spectra = [{m: rec.spectra[k][m][-1] for m, _ in pack.matrices} for k in range(pack.K)]
        thy.measure(epoch, pack.params, spectra, dead)
    if lemma_stage is not None:
        thy.check_lemmas(lemma_stage, epoch, pack.params, dead)


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    """What a user must see even with --quiet."""
    print(msg, file=sys.stderr, flush=True)


# -- CLI -----------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train packs of runs as batched models",
                              description="Train each pack file (JSON/YAML list of run specs, or "
                                          "{'runs': [...]}) as one batched model.")
    p.add_argument("packs", nargs="+", help="pack file(s)")
    p.add_argument("--out", default="results/runs", help="directory of run outputs (default: results/runs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the pack's checkpoint lives (default: <out>/../packs/<pack_id>)")
    p.add_argument("--checkpoint-every", type=int, default=5, help="epochs between checkpoints (default 5)")
    p.add_argument("--data-dir", default=None,
                   help="read the dataset only from DIR/<name>/, as `rankbias data fetch --dest DIR` "
                        "writes it (default: search $RANKBIAS_DATA, ./data, the cache, the downloads)")
    p.add_argument("--graph", default=None, choices=list(GRAPH_MODES),
                   help="CUDA graph for the training step: auto (capture, check against the "
                        "eager step, keep the faster), on, off (default: $RANKBIAS_GRAPH, else "
                        "auto; the CPU is always eager)")
    p.add_argument("--deterministic", default="on", choices=["on", "off"],
                   help="deterministic CUDA kernels, so runs and resumes are bit-identical "
                        "(default on; the config key `deterministic`)")
    p.add_argument("--device-memory-mb", type=int, default=None,
                   help="memory of the training device in MiB: a pack whose estimate "
                        "(rankbias.plan.cluster.estimate_mem_mb) exceeds it is refused before anything "
                        "trains (default: the CUDA device's memory, or the host's)")
    p.add_argument("--update", default="fused", choices=list(UPDATE_MODES),
                   help="parameter update: fused (default: one pass a member, fast) or torch "
                        "(torch.optim.SGD's operations in its order, so a pack on the CPU follows "
                        "nn.Module + torch.optim.SGD bit for bit in float32: for peer checks) or columns "
                        "(three ops on [K, 1] columns, what fused runs off the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--progress-fd", type=int, default=None, metavar="FD",
                   help="also write progress lines, one per pack at least every "
                        f"{MAX_SILENCE:g} s while it trains (pack, epoch, loss, mean rank, ETA), "
                        "to the open file descriptor FD (the workflow: the terminal, while "
                        "stderr goes to the job's log)")
    p.add_argument("--run-plan", default=None, metavar="FILE",
                   help="the whole run's plan (the workflow writes it when it starts): with "
                        "--progress-fd, a pack done also prints the packs left and their estimate "
                        "(a missing or unreadable FILE prints nothing more)")
    p.add_argument("--expect-outputs", nargs="+", default=None, metavar="FILE",
                   help="the files this command must write (the workflow rule's declared outputs): "
                        "each must lie under --out, checked before anything trains, and must exist "
                        "once training is done; a missing one fails the command, naming it")
    p.set_defaults(func=_cmd_train)


def check_expected_under(expected: list[str], out: str | Path) -> None:
    """--expect-outputs before training: every file lies under `out`; ValueError naming
    the first that does not."""
    root = Path(os.path.abspath(out))
    for f in expected:
        if not Path(os.path.abspath(f)).is_relative_to(root):
            raise ValueError(f"--expect-outputs {f}: not under --out {out}; a pack writes only "
                             f"{out}/<run_id>/ for each member")


def check_expected_written(expected: list[str]) -> None:
    """--expect-outputs after training: every file exists; ValueError naming the missing."""
    missing = [f for f in expected if not Path(f).is_file()]
    if missing:
        raise ValueError(f"--expect-outputs: training is done but {len(missing)} declared output(s) "
                         f"were not written: {', '.join(missing)} (expected <out>/<run_id>/run.json "
                         f"of a member of the pack(s) given)")


def graph_mode(arg: str | None) -> str:
    """--graph (the workflow passes the config's `graph` as a job resource, so that the
    choice, which changes no result, retrains nothing when changed), else
    $RANKBIAS_GRAPH, else auto."""
    if arg is not None:
        return arg
    mode = os.environ.get("RANKBIAS_GRAPH", "auto")
    if mode not in GRAPH_MODES:
        raise ValueError(f"RANKBIAS_GRAPH: {mode!r} is not one of {', '.join(GRAPH_MODES)}")
    return mode


def _cmd_train(args: argparse.Namespace) -> int:
    deterministic = args.deterministic == "on"
    numerics.prepare_environment(deterministic)    # before anything starts CUDA
    graph = graph_mode(args.graph)
    packs = [load_pack(p) for p in args.packs]   # validate every file before training any
    if len(packs) > 1 and args.checkpoint_dir:
        raise ValueError("--checkpoint-dir: give it only with a single pack file")
    if args.device_memory_mb is not None and args.device_memory_mb < 1:
        raise ValueError(f"--device-memory-mb: expected an integer >= 1, got {args.device_memory_mb}")
    if args.expect_outputs:
        check_expected_under(args.expect_outputs, args.out)
    run_plan = read_plan(args.run_plan) if args.run_plan else None
    # Take a GPU slot before anything touches CUDA: CUDA_VISIBLE_DEVICES is read when
    # the driver starts, so concurrent jobs on one workstation each get their own GPU.
    ctx: contextlib.AbstractContextManager[int | None] = contextlib.nullcontext()
    if args.device in ("auto", "cuda"):      # cuda:N names its device itself
        ctx = acquire_gpu()
    with ctx:
        dev = resolve_device(args.device)
        for path, specs in zip(args.packs, packs):   # every pack fits before any trains
            try:
                check_pack_memory(specs, dev, args.device_memory_mb)
            except SpecError as e:
                raise SpecError(f"pack file {path}: {e}") from None
        terminal = open_fd(args.progress_fd) if args.progress_fd is not None else None
        for specs in packs:
            try:
                train_pack(specs, args.out, args.device, args.checkpoint_dir, args.checkpoint_every,
                           args.data_dir, progress=not args.quiet, graph=graph,
                           device_memory_mb=args.device_memory_mb, deterministic=deterministic,
                           terminal=terminal, update=args.update, run_plan=run_plan)
            except Preempted as e:
                _warn(str(e))
                return PREEMPTED_EXIT
    if args.expect_outputs:
        check_expected_written(args.expect_outputs)
    return 0
