"""GPU readiness and a profile's measured time, in one command of at most a few minutes.

Parts (each says whether it passed; the exit status is 1 if any failed):
  * tests: the CUDA tests, among them a conv pack and a ResNet-18 pack trained twice and
    killed-and-resumed under the deterministic policy, all bit-identical;
  * bench: the engine against the reference loop (MLP-BN-10-100, K 16, 64, 256);
  * timings: every distinct pack shape of the profile(s) (`rankbias.plan.cluster.shape_key`:
    model, input, data size, B, K, loss, precision, Theorem 1's sampling) trained once on
    random data of the dataset's shape and size: the pack built and its step chosen as
    training does (set-up), at least 200 steady steps with that stepper (or, for steps
    so slow that 200 would take over `--step-seconds`, as many as fit, at least 20), and
    one logged epoch (evaluation of the whole train and test sets, every spectrum,
    Theorem 1's measurement). It prints a table per pack shape and each profile's total
    GPU-hours, and writes the timings (`--timings-out`) that `rankbias.plan.cluster` then
    uses for the workflow's job time limits.
Shapes are timed largest first, within `--budget` seconds from the start; a shape the
budget left untimed is estimated by the cost model, and its row says so.

Runs from a plain checkout (`PYTHONPATH=src python3 scripts/gpu_check.py`, or `make
gpu-check`) with torch, numpy, pandas and pytest; it installs nothing. CIFAR-10 need
not be present: the data is random, shaped and sized like it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tests that need a CUDA device (each skips itself elsewhere; their names say cuda).
CUDA_TESTS = ["tests/test_graphs.py", "tests/test_numerics.py", "tests/test_engine.py", "-k", "cuda"]
MIN_STEPS = 200
WARM_STEPS = 3       # untimed steps before the timed ones (on CUDA the stepper's choice ran more)


def shapes_of(plans: dict) -> dict[str, list]:
    """shape key -> [(config, pack specs), ...] over every pack of every plan."""
    from rankbias.plan.cluster import shape_key
    out: dict[str, list] = {}
    for name, plan in plans.items():
        for pid in plan.packs:
            specs = plan.pack_specs(pid)
            out.setdefault(shape_key(specs), []).append((name, specs))
    return out


def profile_hours(plans: dict, timings: dict, device: str = "cuda") -> dict[str, float]:
    """Each plan's GPU-hours: every pack's `cluster.estimate_seconds` from `timings` (the
    cost model for a shape they lack)."""
    from rankbias.plan.cluster import estimate_seconds
    return {name: sum(estimate_seconds(plan.pack_specs(pid), device, timings) for pid in plan.packs) / 3600
            for name, plan in plans.items()}


def random_dataset(specs, dev, cache: dict):
    """Random inputs and labels of the pack's dataset's shape and (subset) size, made
    on the device once per shape and size."""
    import torch

    from rankbias.train.data import Dataset
    from rankbias.core.spec import DATASET_DIMS, NUM_CLASSES
    train, test = specs.sizes()
    key = (specs.dataset, train, test)
    if key not in cache:
        cache.clear()            # one at a time: CIFAR-sized data is 0.7 GB
        g = torch.Generator(device=dev).manual_seed(0)
        dim = DATASET_DIMS[specs.dataset]
        cache[key] = Dataset(
            name=f"random-{specs.dataset}-shaped",
            x_train=torch.randn(train, dim, generator=g, device=dev),
            y_train=torch.randint(NUM_CLASSES, (train,), generator=g, device=dev),
            x_test=torch.randn(test, dim, generator=g, device=dev),
            y_test=torch.randint(NUM_CLASSES, (test,), generator=g, device=dev),
            num_classes=NUM_CLASSES)
    return cache[key]


def _sync(dev):
    import torch
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def time_steps(specs, ds, dev, min_steps: int = MIN_STEPS, step_seconds: float = 10.0,
               graph: str = "auto") -> dict:
    """Set-up (the pack built, its step chosen: on CUDA captured, checked and timed, as in
    training) and steady steps with that stepper, as an epoch runs them."""
    from rankbias.train import numerics
    from rankbias.train.engine import GraphedStep, Pack
    sync = _sync(dev)
    with numerics.policy(True, specs.precision, dev.type):
        sync()
        t0 = time.perf_counter()
        pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, dev, graph=graph)
        plan = pack.epoch_plan(0)
        step = pack.stepper(plan)
        sync()
        setup_s = time.perf_counter() - t0
        for _ in range(WARM_STEPS):      # untimed: the first calls pay for tracing and caches
            step(plan.inputs(0))
        want = min(min_steps, specs.steps)
        done, epoch, t = 0, 0, 0
        sync()
        t0 = time.perf_counter()
        while done < want:
            inputs = plan.inputs(t)
            if t >= plan.full_steps:
                pack.step(inputs)                      # the partial last batch runs eagerly
            elif isinstance(step, GraphedStep) and t > 0:
                step._refresh(inputs, plan.per_step)   # as GraphedStep.run does within an epoch
            else:
                step(inputs)
            done, t = done + 1, t + 1
            if t == plan.steps:
                epoch, t = epoch + 1, 0
                plan = pack.epoch_plan(epoch)
            if done >= 20 and done % 10 == 0:
                sync()
                if (time.perf_counter() - t0) / done * want > step_seconds:
                    break
        sync()
        return {"step_s": (time.perf_counter() - t0) / done, "steps_timed": done, "setup_s": setup_s,
                "step_mode": pack.step_mode}


def time_logged_epoch(specs, ds, dev) -> dict:
    """One logged epoch as training records it (evaluation of the whole train and test
    sets, every spectrum, Theorem 1), with the parts that can dominate timed apart."""
    from rankbias.train import numerics
    from rankbias.train.engine import Pack
    from rankbias.train.theory import TheoryRecorder
    from rankbias.train.loop import Recorder, _theory
    sync = _sync(dev)
    parts = {"evaluation": 0.0, "operator_spectra": 0.0}
    with numerics.policy(True, specs.precision, dev.type):
        pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, dev, graph="off")

        def timed(name, fn):
            def call(*a, **kw):
                sync()
                t = time.perf_counter()
                out = fn(*a, **kw)
                sync()
                parts[name] += time.perf_counter() - t
                return out
            return call

        pack.evaluate = timed("evaluation", pack.evaluate)                 # type: ignore[method-assign]
        pack.operator_spectra = timed("operator_spectra", pack.operator_spectra)  # type: ignore[method-assign]
        rec = Recorder(pack, ds)
        thy = TheoryRecorder(specs, ds.x_train, ds.y_train, ds.num_classes)
        sync()
        t0 = time.perf_counter()
        rec.record(0, None, final=False)
        _theory(thy, pack, rec, 0, None)
        sync()
        total = time.perf_counter() - t0
    theorem1 = thy.seconds["theorem1"]
    return {"logged_epoch_s": total, "evaluation_s": parts["evaluation"],
            "operator_spectra_s": parts["operator_spectra"], "theorem1_s": theorem1,
            "weight_spectra_s": max(0.0, total - theorem1 - sum(parts.values()))}


def _run(cmd: list[str]) -> bool:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode == 0


def _short(mode: str) -> str:
    return "graph" if mode.startswith("cuda-graph") else "eager"


def _guarded(what: str, fn, *a):
    """fn(*a), or None after printing why it failed (the other shapes go on)."""
    import torch
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - a shape that fails is reported, the rest go on
        print(f"{what}: FAILED {type(e).__name__}: {e}", flush=True)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def timings_part(args, start: float) -> tuple[dict, bool]:
    """Two passes over the shapes, largest first: steps of every shape, then logged
    epochs while the budget lasts (a slow logged epoch cannot cost the step times of
    the shapes after it). Prints the table and totals; writes the file."""
    import torch

    from rankbias.plan import sweep
    from rankbias.plan.cluster import (TIMINGS_FORMAT, ShapeTiming, estimate_seconds, model_logged_epoch_seconds,
                                  model_seconds, logged_epochs)
    from rankbias.train.loop import device_name, resolve_device
    dev = resolve_device(args.device)
    device = "cuda" if dev.type == "cuda" else "cpu"
    plans = {c: sweep.plan_from_file(c) for c in args.config}
    shapes = shapes_of(plans)
    # largest first (by the cost model), so a budget cut leaves the small ones estimated
    order = sorted(shapes, key=lambda k: -sum(model_seconds(s, device) for _, s in shapes[k]))
    rows: dict[str, dict] = {}
    cache: dict = {}
    ok = True
    n = len(order)
    for i, key in enumerate(order):
        specs = shapes[key][0][1]
        if time.monotonic() - start > args.budget:
            print(f"steps [{i + 1}/{n}] {key}: budget of {args.budget:g} s spent; cost model", flush=True)
            continue
        r = _guarded(f"steps [{i + 1}/{n}] {key}", lambda s: time_steps(
            s, random_dataset(s, dev, cache), dev, args.min_steps, args.step_seconds, args.graph), specs)
        if r is None:
            ok = False
            continue
        rows[key] = r
        print(f"steps [{i + 1}/{n}] {key}: {1e3 * r['step_s']:.3f} ms/step over {r['steps_timed']}, "
              f"set-up {r['setup_s']:.1f} s, {r['step_mode']}", flush=True)
    for i, key in enumerate(order):
        if key not in rows:
            continue
        specs = shapes[key][0][1]
        if time.monotonic() - start > args.budget:
            print(f"logged epoch [{i + 1}/{n}] {key}: budget of {args.budget:g} s spent; cost model",
                  flush=True)
            continue
        r = _guarded(f"logged epoch [{i + 1}/{n}] {key}",
                     lambda s: time_logged_epoch(s, random_dataset(s, dev, cache), dev), specs)
        if r is None:
            ok = False
            continue
        rows[key].update(r)
        print(f"logged epoch [{i + 1}/{n}] {key}: {r['logged_epoch_s']:.2f} s: evaluation "
              f"{r['evaluation_s']:.2f}, weight spectra {r['weight_spectra_s']:.2f}, operator spectra "
              f"{r['operator_spectra_s']:.2f}, Theorem 1 {r['theorem1_s']:.2f}", flush=True)
    cache.clear()
    timings = {k: ShapeTiming(r["step_s"], r.get("logged_epoch_s"), r["setup_s"]) for k, r in rows.items()}

    print(f"\n{'model':<14} {'data':<8} {'B':>6} {'K':>3} {'packs':>5} {'steps':>9} {'ms/step':>8} "
          f"{'step':<6} {'logged s':>8} {'x':>4} {'hours':>7}  source")
    for key in order:
        packs = shapes[key]
        first = packs[0][1]
        B, K = first.batch_size, len(first)
        steps = sum(s.steps for _, s in packs)
        hours = sum(estimate_seconds(s, device, timings) for _, s in packs) / 3600
        logged = logged_epochs(first)
        r = rows.get(key)
        if r is None:
            ms, mode, source = f"{'-':>8}", "-", "cost model"
        else:
            ms, mode, source = f"{1e3 * r['step_s']:>8.3f}", _short(r["step_mode"]), "measured"
        if r is not None and "logged_epoch_s" in r:
            logged_s = f"{r['logged_epoch_s']:>8.2f}"
        else:
            logged_s = f"{model_logged_epoch_seconds(packs[0][1], device):>7.2f}*"
            source += "; logged epoch: cost model" if r is not None else ""
        print(f"{first.model:<14} {first.dataset:<8} {B:>6} {K:>3} {len(packs):>5} {steps:>9} {ms} "
              f"{mode:<6} {logged_s} {logged:>4} {hours:>7.2f}  {source}")
    totals = profile_hours(plans, timings, device)
    for name, hours in totals.items():
        mine = [k for k in shapes if any(c == name for c, _ in shapes[k])]
        steps_m = sum(1 for k in mine if k in rows)
        logged_m = sum(1 for k in mine if "logged_epoch_s" in rows.get(k, {}))
        unit = "GPU-hours" if device == "cuda" else "CPU-hours"
        print(f"profile {name}: {len(plans[name].packs)} packs, {hours:.2f} {unit} ({steps_m} of "
              f"{len(mine)} shapes' steps and {logged_m} logged epochs measured; * = cost model)", flush=True)
    doc = {"format": TIMINGS_FORMAT, "device": device_name(dev), "torch": torch.__version__,
           "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "min_steps": args.min_steps, "configs": list(args.config),
           "profile_hours": {n: round(h, 4) for n, h in totals.items()},
           "shapes": [{"key": k, **{f: (round(v, 7) if isinstance(v, float) else v) for f, v in r.items()}}
                      for k, r in rows.items()]}
    if args.timings_out:
        out = Path(args.timings_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out)
        print(f"timings: {out}")
    return doc, ok and all(h == h for h in totals.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script)")
    ap.add_argument("--config", action="append", default=None,
                    help="a profile to time (repeatable; default config/paper.yaml)")
    ap.add_argument("--min-steps", type=int, default=MIN_STEPS, help="steady steps timed per shape (default 200)")
    ap.add_argument("--step-seconds", type=float, default=10.0,
                    help="fewer steps (at least 20) where min-steps would take longer than this")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds from the start after which no further shape is timed (default 420)")
    ap.add_argument("--graph", default="auto", help="as `rankbias train --graph`")
    ap.add_argument("--timings-out", default=str(ROOT / "results" / "gpu-timings.json"),
                    help="where the timings go (default results/gpu-timings.json; '' for nowhere)")
    ap.add_argument("--test-timeout", type=int, default=120, help="seconds per CUDA test (default 120)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "timings"])
    args = ap.parse_args(argv)
    args.config = args.config or [str(ROOT / "config" / "paper.yaml")]
    from rankbias.train import numerics
    numerics.prepare_environment(True)        # before anything starts CUDA
    start = time.monotonic()
    failed = []
    if "tests" not in args.skip:
        # each test at most --test-timeout seconds where pytest-timeout is there to enforce it
        limit = (["--timeout", str(args.test_timeout)]
                 if importlib.util.find_spec("pytest_timeout") is not None else [])
        if not _run([sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", *limit,
                     *CUDA_TESTS]):
            failed.append("tests")
    if "bench" not in args.skip:
        if not _run([sys.executable, "-m", "rankbias.cli", "bench", "--device", args.device,
                     "--workload", "mlp", "--K", "16", "64", "256", "--rounds", "3"]):
            failed.append("bench")
    if "timings" not in args.skip:
        _, ok = timings_part(args, start)
        if not ok:
            failed.append("timings")
    print(f"gpu-check: {time.monotonic() - start:.0f} s;", "FAILED: " + ", ".join(failed) if failed else "ok",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
