"""GPU readiness: the CUDA tests, the bench with its roofline, one timed epoch of the
paper profile's slowest pack, and the paper profile's GPU-hours from that timing.

Runs from a plain checkout (`PYTHONPATH=src python3 scripts/gpu_check.py`, or
`make gpu-check`) with torch, numpy, pandas and pytest; it installs nothing. The
epoch is timed on random CIFAR-shaped data, so CIFAR-10 need not be present.
Every part says whether it passed; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tests that need a CUDA device (each skips itself elsewhere) and the CPU tests of
# the code they exercise.
CUDA_TESTS = ["tests/test_graphs.py", "tests/test_engine.py"]


def slowest_pack(plan) -> str:
    """The pack with the most steps (its smallest batch sets the count), ties broken
    by the cost model's estimate."""
    from rankbias.cluster import estimate_seconds
    return max(plan.packs, key=lambda pid: (plan.steps(pid), estimate_seconds(plan.pack_specs(pid), "cuda")))


def estimate_gpu_hours(plan, ref_specs, step_s: float, record_s: float) -> float:
    """GPU-hours of every pack of `plan`, from one pack's measured step and logged-epoch
    (evaluation, spectra and Theorem 1's measurement) times: a step takes at least the measured one (small
    steps are bound by launches, not arithmetic), and longer in proportion to its
    FLOPs where it has more; a logged epoch scales with the pack's FLOPs per sample."""
    from rankbias.cluster import step_flops
    ref_flops = step_flops(ref_specs)
    ref_per_sample = ref_flops / max(s.batch_size for s in ref_specs)
    seconds = 0.0
    for pid in plan.packs:
        specs = plan.pack_specs(pid)
        flops = step_flops(specs)
        per_sample = flops / max(s.batch_size for s in specs)
        logged = specs[0].epochs // specs[0].log_every + 1
        seconds += plan.steps(pid) * step_s * max(1.0, flops / ref_flops)
        seconds += logged * record_s * max(1.0, per_sample / ref_per_sample)
    return seconds / 3600.0


def time_epoch(specs, device: str, max_steps: int | None = None) -> dict:
    """Seconds per step over one epoch of `specs` (or its first `max_steps` steps) on
    random data shaped like the pack's dataset, and one logged epoch's record
    (evaluation, spectra and Theorem 1)."""
    import torch

    from rankbias.data import Dataset
    from rankbias.engine import Pack
    from rankbias.spec import DATASET_DIMS, NUM_CLASSES
    from rankbias.theory import TheoryRecorder
    from rankbias.train import Recorder, _theory, resolve_device
    dev = resolve_device(device)
    train, test = specs[0].sizes()
    dim = DATASET_DIMS[specs[0].dataset]
    g = torch.Generator().manual_seed(0)
    ds = Dataset(name=f"random-{specs[0].dataset}-shaped",
                 x_train=torch.randn(train, dim, generator=g).to(dev),
                 y_train=torch.randint(NUM_CLASSES, (train,), generator=g).to(dev),
                 x_test=torch.randn(test, dim, generator=g).to(dev),
                 y_test=torch.randint(NUM_CLASSES, (test,), generator=g).to(dev),
                 num_classes=NUM_CLASSES)
    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, dev)
    plan = pack.epoch_plan(0)
    step = pack.stepper(plan)                 # captures and checks the graph on CUDA
    steps = min(plan.steps, max_steps or plan.steps)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for t in range(steps):
        step(plan.inputs(t))
    sync()
    step_s = (time.perf_counter() - t0) / steps
    rec = Recorder(pack, ds)
    thy = TheoryRecorder(specs, ds.x_train, ds.y_train, ds.num_classes)
    t0 = time.perf_counter()
    rec.record(0, None, final=False)          # a logged epoch: evaluation and spectra,
    _theory(thy, pack, rec, 0, None)          # and Theorem 1 measured, as training does
    sync()
    return {"steps": steps, "epoch_steps": plan.steps, "step_s": step_s,
            "epoch_s": step_s * plan.steps, "record_s": time.perf_counter() - t0,
            "step_mode": pack.step_mode, "device": str(dev)}


def _run(cmd: list[str]) -> bool:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script)")
    ap.add_argument("--config", default=str(ROOT / "config" / "paper.yaml"))
    ap.add_argument("--max-steps", type=int, default=None, help="time at most this many steps of the epoch")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "epoch"])
    args = ap.parse_args(argv)
    failed = []
    if "tests" not in args.skip:
        if not _run([sys.executable, "-m", "pytest", "-q", "-rs", *CUDA_TESTS]):
            failed.append("tests")
    if "bench" not in args.skip:
        if not _run([sys.executable, "-m", "rankbias.cli", "bench", "--device", args.device, "--json"]):
            failed.append("bench")
    if "epoch" not in args.skip:
        from rankbias import sweep
        plan = sweep.plan_from_file(args.config)
        pid = slowest_pack(plan)
        specs = plan.pack_specs(pid)
        s0 = specs[0]
        print(f"slowest pack {pid}: K={len(specs)} {s0.model} on {s0.dataset}, "
              f"B={min(s.batch_size for s in specs)}, {plan.steps(pid)} steps", flush=True)
        timing = time_epoch(specs, args.device, args.max_steps)
        hours = estimate_gpu_hours(plan, specs, timing["step_s"], timing["record_s"])
        print(json.dumps({"pack": pid, **timing, "paper_profile_packs": len(plan.packs),
                          "paper_profile_gpu_hours": float(f"{hours:.4g}")}))
        if not math.isfinite(hours):
            failed.append("epoch")
    print("gpu-check:", "FAILED: " + ", ".join(failed) if failed else "ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
