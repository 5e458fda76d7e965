"""`rankbias train`: train a pack, record every metric, checkpoint, write run outputs."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import data as data_mod
from . import metrics as M
from .engine import GRAPH_MODES, Pack
from .results import atomic_write_bytes, write_run
from .spec import RunSpec, load_pack, pack_id

CHECKPOINT = "checkpoint.pt"


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
        self.spectra: list[dict[str, list]] = [{m: [] for m, _ in pack.matrices} for _ in range(pack.K)]
        self.logged_epochs: list[int] = []
        self.diverged: list[dict | None] = [None] * pack.K

    def state(self) -> dict:
        return {"metrics": self.metrics, "layers": self.layers, "spectra": self.spectra,
                "logged_epochs": self.logged_epochs, "diverged": self.diverged}

    def load_state(self, st: dict) -> None:
        for k in ("metrics", "layers", "spectra", "logged_epochs", "diverged"):
            setattr(self, k, st[k])

    @torch.no_grad()
    def record(self, epoch: int, prev: dict[str, torch.Tensor] | None, final: bool) -> dict:
        """Metrics of the state after `epoch` epochs (epoch 0 = initialisation)."""
        pack, K = self.pack, self.pack.K
        spec0 = pack.specs[0]
        step_loss = pack.epoch_loss().cpu().numpy() if epoch > 0 else np.full(K, np.nan)
        # Divergence: a member whose loss or weights went non-finite leaves the pack.
        if epoch > 0:
            finite_w = pack.finite().cpu().numpy()
            for k in range(K):
                if self.diverged[k] is None and (not np.isfinite(step_loss[k]) or not finite_w[k]):
                    reason = "non-finite training loss" if not np.isfinite(step_loss[k]) else "non-finite weights"
                    self.diverged[k] = {"epoch": epoch, "reason": reason}
                    pack.freeze(k)
        dead = np.array([d is not None for d in self.diverged])
        logged = epoch == 0 or final or epoch % spec0.log_every == 0

        dist, norms, sv = {}, {}, {}
        for m, _ in pack.matrices:
            w = pack.weight(m)
            norms[m] = torch.linalg.matrix_norm(w.double()).cpu().numpy()
            dist[m] = (M.relative_distance(prev[m], w).cpu().numpy() if prev is not None
                       else np.full(K, np.nan))
            if logged:
                sv[m] = M.singular_values(w).cpu().numpy()
        if logged:
            tr_loss, tr_acc = (t.cpu().numpy() for t in pack.evaluate(self.ds.x_train, self.ds.y_train))
            te_loss, te_acc = (t.cpu().numpy() for t in pack.evaluate(self.ds.x_test, self.ds.y_test))
            self.logged_epochs.append(epoch)
        else:
            tr_loss = tr_acc = te_loss = te_acc = np.full(K, np.nan)

        mean_ranks = []
        for k, spec in enumerate(pack.specs):
            hidden_ranks = []
            for i, (m, kind) in enumerate(pack.matrices):
                if logged:
                    s = np.full_like(sv[m][k], np.nan) if dead[k] else sv[m][k]
                    self.spectra[k][m].append(s)
                    if kind == "hidden" and not dead[k]:
                        hidden_ranks.append(int(M.rank(s)))
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

    def frames(self, k: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
        spectra = {"epochs": np.array(self.logged_epochs, dtype=np.int64),
                   "layers": np.array([m for m, _ in self.pack.matrices])}
        for i, (m, _) in enumerate(self.pack.matrices):
            spectra[f"sv_{i}"] = np.stack(self.spectra[k][m]).astype(np.float64)
        return pd.DataFrame(self.metrics[k]), pd.DataFrame(self.layers[k]), spectra


def _save_checkpoint(path: Path, epoch: int, run_ids: list[str], pack: Pack, rec: Recorder,
                     elapsed: float) -> None:
    import io
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "run_ids": run_ids, "pack": pack.state(), "recorder": rec.state(),
                "elapsed": elapsed}, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_pack(specs: list[RunSpec], out_dir: str | Path, device: str = "auto",
               checkpoint_dir: str | Path | None = None, checkpoint_every: int = 5,
               data_dir: str | Path | None = None, dataset=None, progress: bool = True,
               on_epoch=None, graph: str = "auto") -> list[Path]:
    """Train one pack and write `out_dir/<run_id>/` for each member.

    Resumes from `checkpoint_dir/checkpoint.pt` when it holds this pack. `on_epoch(epoch)`
    is called after each epoch's checkpoint (tests use it to simulate a kill). `graph`
    (auto|on|off) says whether a CUDA step may be a captured graph (engine.choose_stepper).
    """
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every: must be >= 1, got {checkpoint_every}")
    out_dir = Path(out_dir)
    pid = pack_id(specs)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "packs" / pid
    ckpt_path = checkpoint_dir / CHECKPOINT
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)   # graphs, streams and events use the current device
    s0 = specs[0]
    ds = dataset or data_mod.load(s0.dataset, dev, data_dir, s0.train_subset, s0.test_subset)
    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, dev, graph=graph)
    rec = Recorder(pack, ds)
    run_ids = [s.run_id for s in specs]
    from . import provenance  # imported late: it inspects git and packages

    start, elapsed0 = 0, 0.0
    if ckpt_path.exists():
        st = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if st.get("run_ids") != run_ids:
            raise RuntimeError(f"{ckpt_path}: checkpoint belongs to another pack "
                               f"(runs {st.get('run_ids')}); delete it to start afresh")
        pack.load_state(st["pack"])
        rec.load_state(st["recorder"])
        start, elapsed0 = st["epoch"], st["elapsed"]
        _log(progress, f"[pack {pid}] resuming from {ckpt_path} at epoch {start}/{s0.epochs}")
    else:
        info = rec.record(0, None, final=s0.epochs == 0)
        _log(progress, f"[pack {pid}] K={pack.K} {s0.model} on {s0.dataset} ({pack.n} samples), "
                       f"{dev.type}: epoch 0 mean rank {info['mean_rank']:.1f}")
    t0 = time.perf_counter()
    for epoch in range(start, s0.epochs):
        prev = {m: pack.weight(m).detach().clone() for m, _ in pack.matrices}
        pack.train_epoch(epoch)
        if epoch == start:
            _log(progress, f"[pack {pid}] step: {pack.step_mode}")
        info = rec.record(epoch + 1, prev, final=epoch + 1 == s0.epochs)
        done = epoch + 1 - start
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (s0.epochs - epoch - 1)
        rank = f" mean rank {info['mean_rank']:.1f}" if info["mean_rank"] is not None else ""
        div = f" ({info['diverged']} diverged)" if info["diverged"] else ""
        _log(progress, f"[pack {pid}] epoch {epoch + 1}/{s0.epochs} loss {info['loss']:.4f}{rank}{div} "
                       f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s")
        if (epoch + 1) % checkpoint_every == 0 and epoch + 1 < s0.epochs:
            _save_checkpoint(ckpt_path, epoch + 1, run_ids, pack, rec, elapsed0 + elapsed)
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if info["diverged"] == pack.K:
            _log(progress, f"[pack {pid}] every member diverged; stopping")
            break
    wall = elapsed0 + time.perf_counter() - t0

    env = provenance.collect(device=dev.type)
    paths = []
    for k, spec in enumerate(specs):
        metrics, layers, spectra = rec.frames(k)
        run_json = {
            "run_id": spec.run_id, "spec": spec.to_dict(), "model": spec.model, "pack_id": pid,
            "pack_size": pack.K, "status": "complete", "diverged": rec.diverged[k],
            "epochs_completed": int(metrics["epoch"].max()),
            "wall_time_s": round(wall, 3), "device": device_name(dev), "step": pack.step_mode,
            "seeds": {"init": f"torch.manual_seed({spec.seed})",
                      "data_order": f"torch.randperm, Generator seed {spec.seed} * 1000003 + epoch + 1"},
            "dataset": {"name": ds.name, "checksums": ds.checksums, "source": ds.source,
                        "train_size": int(ds.x_train.shape[0]), "test_size": int(ds.x_test.shape[0])},
            "provenance": env,
        }
        write_run(out_dir / spec.run_id, run_json, metrics, layers, spectra)
        paths.append(out_dir / spec.run_id)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    _log(progress, f"[pack {pid}] done in {wall:.1f}s; wrote {len(paths)} runs to {out_dir}")
    return paths


def _log(enabled: bool, msg: str) -> None:
    if enabled:
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
    p.add_argument("--data-dir", default=None, help="dataset directory (default: $RANKBIAS_DATA)")
    p.add_argument("--graph", default=None, choices=list(GRAPH_MODES),
                   help="CUDA graph for the training step: auto (capture, check against the "
                        "eager step, keep the faster), on, off (default: $RANKBIAS_GRAPH, else "
                        "auto; the CPU is always eager)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_train)


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
    graph = graph_mode(args.graph)
    packs = [load_pack(p) for p in args.packs]   # validate every file before training any
    if len(packs) > 1 and args.checkpoint_dir:
        raise ValueError("--checkpoint-dir: give it only with a single pack file")
    # Take a GPU slot before anything touches CUDA: CUDA_VISIBLE_DEVICES is read when
    # the driver starts, so concurrent jobs on one workstation each get their own GPU.
    ctx = contextlib.nullcontext()
    if args.device in ("auto", "cuda"):      # cuda:N names its device itself
        from .gpus import acquire_gpu
        ctx = acquire_gpu()
    with ctx:
        for specs in packs:
            train_pack(specs, args.out, args.device, args.checkpoint_dir, args.checkpoint_every,
                       args.data_dir, progress=not args.quiet, graph=graph)
    return 0
