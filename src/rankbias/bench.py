"""`rankbias bench`: the batched engine against the reference loop, in one process.

Workload (fixed, so numbers compare across machines): MLP-BN-10-100, batch 16,
CE, synthetic CIFAR-shaped data (3072 inputs). The engine trains K members as one
pack; the reference trains the same K configurations one after another with
nn.Module + torch.optim.SGD. Both are reported in configuration-steps per second.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import data as data_mod
from . import metrics as M
from .engine import Pack
from .reference import build_net, loss_fn
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


def bench_engine(specs, ds, device, steps: int) -> tuple[float, float]:
    """(config-steps/s, seconds to compute every member's spectra once)."""
    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, device)
    plan = pack.epoch_plan(0)
    warm = min(3, plan.steps)
    for t in range(warm):
        pack.step(plan.inputs(t))
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        pack.step(plan.inputs((warm + i) % plan.steps))
    _sync(device)
    rate = len(specs) * steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for m, _ in pack.matrices:
        M.singular_values(pack.weight(m)).cpu()
    _sync(device)
    return rate, time.perf_counter() - t0


def bench_reference(specs, ds, device, steps: int) -> float:
    """config-steps/s of the plain loop training the same configurations in turn."""
    total, elapsed = 0, 0.0
    n = ds.x_train.shape[0]
    for spec in specs:
        net = build_net(spec, ds.input_dim, ds.num_classes).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum,
                              weight_decay=spec.weight_decay)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed)).to(device)
        B = spec.batch_size

        def step(t):
            idx = order[(t * B) % (n - B):(t * B) % (n - B) + B]
            opt.zero_grad(set_to_none=True)
            loss_fn(spec.loss, net(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()

        for t in range(3):
            step(t)
        _sync(device)
        t0 = time.perf_counter()
        for t in range(steps):
            step(3 + t)
        _sync(device)
        elapsed += time.perf_counter() - t0
        total += steps
    return total / elapsed


def run_bench(Ks=(1, 16, 64), device="auto", engine_steps=None, reference_steps=None) -> dict:
    from .train import device_name, resolve_device
    dev = resolve_device(device)
    ds = data_mod.load("synthetic", dev)
    results = []
    for K in Ks:
        specs = _specs(K)
        e_steps = engine_steps or (200 if dev.type == "cuda" else max(10, 160 // K))
        r_steps = reference_steps or (50 if dev.type == "cuda" else 20)
        engine, spectra_s = bench_engine(specs, ds, dev, e_steps)
        # The reference's rate does not depend on K; time at most 8 configurations.
        reference = bench_reference(specs[: min(K, 8)], ds, dev, r_steps)
        epoch_s = CIFAR_STEPS_B16 * K / engine
        results.append({"K": K, "engine": round(engine, 2), "reference": round(reference, 2),
                        "ratio": round(engine / reference, 2),
                        "spectra_s": round(spectra_s, 5),
                        "spectra_share_of_cifar_epoch": round(spectra_s / (epoch_s + spectra_s), 5)})
    return {"device": device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "workload": "MLP-BN-10-100, B=16, CE, synthetic 3072-dim inputs",
            "unit": "configuration-steps per second", "results": results}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time the batched engine against the reference loop")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--K", type=int, nargs="+", default=[1, 16, 64], help="pack sizes (default 1 16 64)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    out = run_bench(tuple(args.K), args.device)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"device: {out['device']} (torch {out['torch']}, {out['threads']} threads); {out['workload']}")
    print(f"{'K':>4} {'engine':>12} {'reference':>12} {'ratio':>7}  spectra share of a CIFAR epoch")
    for r in out["results"]:
        print(f"{r['K']:>4} {r['engine']:>12.1f} {r['reference']:>12.1f} {r['ratio']:>7.2f}  "
              f"{100 * r['spectra_share_of_cifar_epoch']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(_cmd_bench(argparse.Namespace(json=True, device="auto", K=[1, 16, 64])))
