"""`rankbias bench`: the batched engine against the reference loop, in one process.

Workload (fixed, so numbers compare across machines): MLP-BN-10-100, batch 16,
CE, synthetic CIFAR-shaped data (3072 inputs). The engine trains K members as one
pack; the reference trains the same K configurations one after another with
nn.Module + torch.optim.SGD. Both are reported in configuration-steps per second.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import data as data_mod
from . import metrics as M
from .engine import GRAPH_MODES, GraphedStep, Pack
from .reference import build_net, epoch_order, loss_fn
from .spec import RunSpec

WORKLOAD = dict(dataset="synthetic", arch="mlp_bn", depth=10, width=100, batch_size=16,
                loss="ce", momentum=0.9, weight_decay=5e-4, epochs=1)
# Steps per epoch of the paper's CIFAR-10 runs at B=16, to express spectra cost as a
# share of a real epoch.
CIFAR_STEPS_B16 = 50_000 // 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _specs(K: int) -> list[RunSpec]:
    return [RunSpec(**WORKLOAD, seed=k, lr=0.01 * (1 + k % 4)) for k in range(K)]


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
        """config-steps/s of `step` (default: the chosen one; `pack.step` for eager)."""
        step = step or self.step
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
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
    """The plain loop (nn.Module + torch.optim.SGD) training the configurations in turn."""

    def __init__(self, specs, ds, device):
        self.device, self.ds, self.n = device, ds, ds.x_train.shape[0]
        self.runs = []
        for spec in specs:
            net = build_net(spec, ds.input_dim, ds.num_classes).to(device)
            opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum,
                                  weight_decay=spec.weight_decay)
            order = epoch_order(spec, 0, self.n).to(device)
            self.runs.append([spec, net, opt, order, 0])
        self(3)                                         # warm-up

    def __call__(self, steps: int) -> float:
        elapsed = 0.0
        for run in self.runs:
            spec, net, opt, order, t = run
            B = spec.batch_size
            _sync(self.device)
            t0 = time.perf_counter()
            for i in range(t, t + steps):
                lo = (i * B) % (self.n - B)
                idx = order[lo:lo + B]
                opt.zero_grad(set_to_none=True)
                loss_fn(spec.loss, net(self.ds.x_train[idx]), self.ds.y_train[idx]).backward()
                opt.step()
            _sync(self.device)
            elapsed += time.perf_counter() - t0
            run[4] = t + steps
        return len(self.runs) * steps / elapsed


def run_bench(Ks=(1, 16, 64), device="auto", engine_steps=None, reference_steps=None,
              rounds: int = 5, graph: str = "auto") -> dict:
    """Engine and reference timed in alternating rounds; each rate is the median round."""
    from .train import device_name, resolve_device
    dev = resolve_device(device)
    ds = data_mod.load("synthetic", dev)
    cuda = dev.type == "cuda"
    results = []
    for K in Ks:
        specs = _specs(K)
        e_steps = engine_steps or (200 if cuda else max(10, 160 // K))
        r_steps = reference_steps or (50 if cuda else 40)
        engine = _EngineTimer(specs, ds, dev, graph)
        # With a captured step, the same pack stepping eagerly shows what the graph buys.
        graphed = isinstance(engine.step, GraphedStep)
        # The reference's rate does not depend on K; time at most 8 configurations.
        reference = _ReferenceTimer(specs[: min(K, 8)], ds, dev)
        e_rates, r_rates, x_rates = [], [], []
        for _ in range(rounds):
            e_rates.append(engine(e_steps))
            r_rates.append(reference(r_steps))
            if graphed:
                x_rates.append(engine(e_steps, engine.pack.step))
        e_rate, r_rate = statistics.median(e_rates), statistics.median(r_rates)
        spectra_s = engine.spectra_seconds()
        epoch_s = CIFAR_STEPS_B16 * K / e_rate
        row = {"K": K, "engine": round(e_rate, 2), "reference": round(r_rate, 2),
               "ratio": round(e_rate / r_rate, 2), "step": engine.pack.step_mode,
               "spectra_s": round(spectra_s, 5),
               "spectra_share_of_cifar_epoch": round(spectra_s / (epoch_s + spectra_s), 5)}
        if x_rates:
            row["engine_eager"] = round(statistics.median(x_rates), 2)
        results.append(row)
        del engine, reference
    return {"device": device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "workload": "MLP-BN-10-100, B=16, CE, synthetic 3072-dim inputs",
            "unit": "configuration-steps per second", "rounds": rounds, "results": results}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time the batched engine against the reference loop")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--K", type=int, nargs="+", default=[1, 16, 64], help="pack sizes (default 1 16 64)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds; the median is kept (default 5)")
    p.add_argument("--graph", default="auto", choices=list(GRAPH_MODES),
                   help="CUDA graph for the engine's step (as in `rankbias train`)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise ValueError(f"--rounds: must be >= 1, got {args.rounds}")
    out = run_bench(tuple(args.K), args.device, rounds=args.rounds, graph=args.graph)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"device: {out['device']} (torch {out['torch']}, {out['threads']} threads); {out['workload']}")
    print(f"{'K':>4} {'engine':>12} {'reference':>12} {'ratio':>7}  spectra/CIFAR epoch  step")
    for r in out["results"]:
        eager = f" (eager step: {r['engine_eager']:.1f})" if "engine_eager" in r else ""
        print(f"{r['K']:>4} {r['engine']:>12.1f} {r['reference']:>12.1f} {r['ratio']:>7.2f}  "
              f"{100 * r['spectra_share_of_cifar_epoch']:>18.2f}%  {r['step']}{eager}")
    return 0


if __name__ == "__main__":
    sys.exit(_cmd_bench(argparse.Namespace(json=True, device="auto", K=[1, 16, 64], rounds=5, graph="auto")))
