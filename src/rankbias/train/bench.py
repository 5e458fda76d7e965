"""`rankbias bench`: the batched engine against the reference loop, in one process.

Workloads (fixed, so numbers compare across machines), each at batch 16 with CE on
synthetic data: MLP-BN-10-100 on CIFAR-shaped inputs (3072 features), CONV-BN-5-64
on MNIST-shaped ones (1x32x32) and RESNET-18 on CIFAR-shaped ones (3x32x32). The
engine trains K members as one pack; the reference trains the same K configurations
one after another with nn.Module + torch.optim.SGD (`rankbias.train.reference`, the loop
the tests hold the engine to). Both are reported in
configuration-steps per second.

Each row also places the engine on the machine's roofline: the step's matmul FLOPs
and least bytes moved (`rankbias.plan.cluster.step_flops` / `step_bytes`), against a large
matmul's throughput and a three-stream add's bandwidth, both measured in the same
process on the same device, in the same alternating rounds as the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from rankbias.train import data as data_mod
from rankbias.store import metrics as M
from rankbias.train import numerics
from rankbias.plan.cluster import roofline_seconds, step_bytes, step_flops
from rankbias.train.engine import GRAPH_MODES, GraphedStep, Pack
from rankbias.train.reference import ReferenceRun
from rankbias.core.spec import DATASET_DIMS, RunSpec
from rankbias.train.loop import resolve_device
from rankbias.train.loop import device_name

COMMON = dict(batch_size=16, loss="ce", momentum=0.9, weight_decay=5e-4, epochs=1)


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str
    dataset: str            # whose input shape the synthetic data takes
    Ks: tuple[int, ...]     # default pack sizes
    engine_steps: int       # timed steps of a round at K=1 (fewer for larger K), CPU
    reference_steps: int    # timed steps of a round per reference configuration, CPU


WORKLOADS = {
    "mlp": Workload("MLP-BN-10-100", "synthetic", (1, 16, 64), 320, 40),
    "conv": Workload("CONV-BN-5-64", "mnist", (1, 4, 16), 32, 8),
    "resnet": Workload("RESNET-18", "synthetic", (1, 4), 4, 2),
}
# Untimed steps at the start of each round, engine and reference alike: the roofs
# measured between rounds stream ~200 MB through the caches, and a round's first step
# would pay for refilling them.
ROUND_WARMUP = 1
# Steps per epoch of the paper's CIFAR-10 runs at B=16, to express spectra cost as a
# share of a real epoch.
CIFAR_STEPS_B16 = 50_000 // 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _specs(w: Workload, K: int) -> list[RunSpec]:
    return [RunSpec.from_dict({**COMMON, "model": w.model, "dataset": w.dataset, "seed": k,
                               "lr": 0.01 * (1 + k % 4)}) for k in range(K)]


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Throughput of one n x n by n x n matmul (2 n^3 FLOPs), the compute roof."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)                                  # warm-up (library, clocks)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    return 2.0 * n ** 3 / (time.perf_counter() - t0)


def stream_bytes_per_second(device: torch.device, dtype: torch.dtype, numel: int | None = None) -> float:
    """Bandwidth of c = a + b over arrays far larger than a CPU's caches (reads of a
    and b plus the write of c, as STREAM counts them), the memory roof."""
    numel = numel or (1 << 28 if device.type == "cuda" else 1 << 24)
    a = torch.ones(numel, device=device, dtype=dtype)
    b = torch.ones(numel, device=device, dtype=dtype)
    c = torch.empty_like(a)
    torch.add(a, b, out=c)                          # warm-up: pages touched
    _sync(device)
    t0 = time.perf_counter()
    torch.add(a, b, out=c)
    _sync(device)
    return 3.0 * numel * a.element_size() / (time.perf_counter() - t0)


def roofline_row(specs, engine_rate: float, reference_rate: float, flops_per_s: float,
                 bytes_per_s: float, itemsize: int) -> dict:
    """Where the engine's step (K members) and the reference's (one) sit against the
    roofline bound of that step on this machine."""
    K = len(specs)
    flops, nbytes = step_flops(specs), step_bytes(specs, itemsize)
    bound = roofline_seconds(flops, nbytes, flops_per_s, bytes_per_s)
    bound_one = roofline_seconds(step_flops(specs[:1]), step_bytes(specs[:1], itemsize),
                                 flops_per_s, bytes_per_s)
    return {"step_flops": flops, "step_bytes": nbytes,
            "matmul_flops_per_s": round(flops_per_s), "stream_bytes_per_s": round(bytes_per_s),
            "bound": "compute" if flops / flops_per_s >= nbytes / bytes_per_s else "memory",
            "roofline_step_ms": round(1e3 * bound, 4),
            "engine_step_ms": round(1e3 * K / engine_rate, 4),
            "roofline_fraction": round(bound * engine_rate / K, 3),
            "reference_roofline_fraction": round(bound_one * reference_rate, 3)}


class _EngineTimer:
    """The engine on K members; each call times `steps` steps (config-steps/s)."""

    def __init__(self, specs, ds, device, graph: str):
        self.device = device
        self.pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, device, graph=graph)
        self.plan = self.pack.epoch_plan(0)
        self.step = self.pack.stepper(self.plan)      # captures and checks the graph on CUDA
        self.t = 0
        self(min(3, self.plan.full_steps))            # warm-up

    def __call__(self, steps: int, step=None) -> float:
        """config-steps/s of `step` (default: the chosen one; `pack.step` for eager),
        after one untimed step (ROUND_WARMUP)."""
        step = step or self.step
        for i in range(ROUND_WARMUP + steps):
            if i == ROUND_WARMUP:
                _sync(self.device)
                t0 = time.perf_counter()
            step(self.plan.inputs(self.t % self.plan.full_steps))   # B-row steps only
            self.t += 1
        _sync(self.device)
        return self.pack.K * steps / (time.perf_counter() - t0)

    def spectra_seconds(self) -> float:
        """Seconds to compute every member's spectra once."""
        _sync(self.device)
        t0 = time.perf_counter()
        for m, _ in self.pack.matrices:
            M.singular_values(self.pack.weight(m)).cpu()
        _sync(self.device)
        return time.perf_counter() - t0


class _ReferenceTimer:
    """The reference loop (`rankbias.train.reference.ReferenceRun`: nn.Module +
    torch.optim.SGD) training the configurations in turn; each call times `steps` of
    its steps per configuration (config-steps/s)."""

    def __init__(self, specs, ds, device):
        self.device, self.n = device, ds.x_train.shape[0]
        self.runs = [ReferenceRun(spec, ds.x_train, ds.y_train, ds.num_classes) for spec in specs]
        for run in self.runs:
            run.start_epoch(0)
        self.t = [0] * len(self.runs)                   # each run's steps so far
        self(3)                                         # warm-up

    def __call__(self, steps: int) -> float:
        elapsed = 0.0
        for j, run in enumerate(self.runs):
            t, B = self.t[j], run.spec.batch_size
            for i in range(t, t + ROUND_WARMUP + steps):
                if i == t + ROUND_WARMUP:
                    _sync(self.device)
                    t0 = time.perf_counter()
                lo = (i * B) % (self.n - B)             # B-row batches of epoch 0's order, round and round
                idx = run.order[lo:lo + B]
                run.step(run.x[idx], run.y[idx])
            _sync(self.device)
            elapsed += time.perf_counter() - t0
            self.t[j] = t + ROUND_WARMUP + steps
        return len(self.runs) * steps / elapsed


def run_bench(workloads=tuple(WORKLOADS), Ks=None, device="auto", engine_steps=None,
              reference_steps=None, rounds: int = 5, graph: str = "auto",
              deterministic: bool = True) -> dict:
    """Engine and reference timed in alternating rounds; each rate is the median round.
    `Ks` (default: each workload's own) are the pack sizes of every workload. Both run
    under training's numerical policy (rankbias.train.numerics: fp32, deterministic kernels
    unless `deterministic` is False)."""
    dev = resolve_device(device)
    with numerics.policy(deterministic, "fp32", dev.type) as policy:
        out = _run_bench(workloads, Ks, dev, engine_steps, reference_steps, rounds, graph)
    return {**out, "numerics": policy}


def _run_bench(workloads, Ks, dev, engine_steps, reference_steps, rounds: int, graph: str) -> dict:
    synthetic = data_mod.load("synthetic", dev)
    cuda = dev.type == "cuda"
    results = []
    for name in workloads:
        w = WORKLOADS[name]
        d = DATASET_DIMS[w.dataset]
        ds = dataclasses.replace(synthetic, x_train=synthetic.x_train[:, :d].contiguous(),
                                 x_test=synthetic.x_test[:, :d].contiguous())
        for K in Ks or w.Ks:
            specs = _specs(w, K)
            e_steps = engine_steps or (200 if cuda else max(2, w.engine_steps // K))
            r_steps = reference_steps or (50 if cuda else w.reference_steps)
            engine = _EngineTimer(specs, ds, dev, graph)
            # With a captured step, the same pack stepping eagerly shows what the graph buys.
            graphed = isinstance(engine.step, GraphedStep)
            # The reference's rate does not depend on K; time at most 8 configurations.
            reference = _ReferenceTimer(specs[: min(K, 8)], ds, dev)
            e_rates, r_rates, x_rates, f_rates, b_rates = [], [], [], [], []
            for _ in range(rounds):
                e_rates.append(engine(e_steps))
                r_rates.append(reference(r_steps))
                if graphed:
                    x_rates.append(engine(e_steps, engine.pack.step))
                f_rates.append(matmul_flops_per_second(dev, ds.x_train.dtype))
                b_rates.append(stream_bytes_per_second(dev, ds.x_train.dtype))
            e_rate, r_rate = statistics.median(e_rates), statistics.median(r_rates)
            spectra_s = engine.spectra_seconds()
            epoch_s = CIFAR_STEPS_B16 * K / e_rate
            row = {"workload": w.model, "K": K, "engine": round(e_rate, 2), "reference": round(r_rate, 2),
                   "ratio": round(e_rate / r_rate, 2), "step": engine.pack.step_mode,
                   "differentiation": engine.pack.differentiation,
                   "spectra_s": round(spectra_s, 5),
                   "spectra_share_of_cifar_epoch": round(spectra_s / (epoch_s + spectra_s), 5),
                   **roofline_row(specs, e_rate, r_rate, statistics.median(f_rates),
                                  statistics.median(b_rates), ds.x_train.element_size())}
            if x_rates:
                row["engine_eager"] = round(statistics.median(x_rates), 2)
            results.append(row)
            del engine, reference
    return {"device": device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "workloads": {n: f"{WORKLOADS[n].model}, B=16, CE, synthetic "
                             f"{DATASET_DIMS[WORKLOADS[n].dataset]}-feature inputs" for n in workloads},
            "unit": "configuration-steps per second", "rounds": rounds, "results": results}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time the batched engine against the reference loop")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                   help="what to time: " + ", ".join(f"{n} ({w.model}, K {' '.join(map(str, w.Ks))})"
                                                     for n, w in WORKLOADS.items())
                        + " (default: all; resnet takes minutes on a CPU)")
    p.add_argument("--K", type=int, nargs="+", default=None,
                   help="pack sizes for every workload (default: each workload's own)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds; the median is kept (default 5)")
    p.add_argument("--graph", default="auto", choices=list(GRAPH_MODES),
                   help="CUDA graph for the engine's step (as in `rankbias train`)")
    p.add_argument("--deterministic", default="on", choices=["on", "off"],
                   help="deterministic CUDA kernels, as training runs by default (default on)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise ValueError(f"--rounds: must be >= 1, got {args.rounds}")
    deterministic = getattr(args, "deterministic", "on") == "on"
    numerics.prepare_environment(deterministic)    # before anything starts CUDA
    out = run_bench(tuple(args.workload), args.K, args.device, rounds=args.rounds, graph=args.graph,
                    deterministic=deterministic)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"device: {out['device']} (torch {out['torch']}, {out['threads']} threads); "
          + "; ".join(out["workloads"].values()))
    print(f"{'workload':<14} {'K':>4} {'engine':>12} {'reference':>12} {'ratio':>7}  spectra/CIFAR epoch  "
          f"roofline (engine, reference)  step")
    for r in out["results"]:
        eager = f" (eager step: {r['engine_eager']:.1f})" if "engine_eager" in r else ""
        print(f"{r['workload']:<14} {r['K']:>4} {r['engine']:>12.1f} {r['reference']:>12.1f} {r['ratio']:>7.2f}  "
              f"{100 * r['spectra_share_of_cifar_epoch']:>18.2f}%  "
              f"{100 * r['roofline_fraction']:>6.1f}%, {100 * r['reference_roofline_fraction']:>5.1f}% "
              f"of {r['roofline_step_ms']:.3f} ms ({r['bound']})  {r['step']}{eager}")
    r = out["results"][-1]
    print(f"roofs: matmul {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, stream "
          f"{r['stream_bytes_per_s'] / 1e9:.1f} GB/s (measured here, last row)")
    return 0


if __name__ == "__main__":
    sys.exit(_cmd_bench(argparse.Namespace(json=True, device="auto", workload=list(WORKLOADS), K=None,
                                           rounds=5, graph="auto")))
