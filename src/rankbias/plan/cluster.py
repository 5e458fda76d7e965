"""Wall-time estimates for cluster jobs.

A SLURM job needs a time limit before it starts. `estimate_runtime_minutes` turns a
pack (runs that train together as one batched model) into a conservative limit: the
work is counted exactly from the specs (steps, parameters, logged epochs, matrices
whose spectra are stored), and converted to seconds with a small cost model.

Origin of the constants: they are deliberately pessimistic order-of-magnitude figures,
not measurements on a particular machine. The GPU throughput (2 TFLOP/s effective,
fp32) is about 4% of an A100/H100's fp32 peak, which is where small batched matmuls
(widths 100-2000, batches 2-128) with elementwise BatchNorm/ReLU/SGD kernels between
them actually land; the per-kernel launch cost (10 us) is CUDA's typical launch
latency plus PyTorch dispatch. The CPU figures (20 GFLOP/s, 20 us per op) are a
two-core laptop running PyTorch's MKL/OpenBLAS kernels. `rankbias bench` measures the
real throughput of a machine; if it is far below these numbers, raise
`SAFETY_FACTOR` (or the profile's runtime) rather than trusting the estimate.

Where a GPU's timings were measured (`make gpu-check` writes them, one row per pack
shape: seconds per step with the stepper training chooses, seconds per logged epoch),
a CUDA estimate uses those instead of the cost model: steps * step_s + logged epochs *
logged_epoch_s + the pack's measured set-up + start-up. `load_timings` finds the file
($RANKBIAS_TIMINGS, else results/gpu-timings.json).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rankbias.core.pack import PackSpec
from rankbias.core.spec import DATASET_DIMS, RunSpec, SpecError


@dataclass(frozen=True)
class CostModel:
    flops_per_second: float       # effective dense throughput (fp32) for these small matmuls
    seconds_per_op: float         # launch + dispatch cost of one kernel/op
    svd_seconds: float            # fixed cost of one singular-value decomposition call
    svd_flops_per_second: float   # throughput of the SVD itself
    startup_seconds: float        # interpreter, imports, dataset to device, CUDA context


COST_MODELS = {
    "cuda": CostModel(flops_per_second=2e12, seconds_per_op=10e-6, svd_seconds=2e-3,
                      svd_flops_per_second=5e10, startup_seconds=120.0),
    "cpu": CostModel(flops_per_second=2e10, seconds_per_op=20e-6, svd_seconds=1e-4,
                     svd_flops_per_second=5e9, startup_seconds=60.0),
}
# Ops per layer per training step: forward (matmul, bias, BN, ReLU), backward (about
# twice that), and the SGD update (weight decay, momentum, step) per parameter tensor.
OPS_PER_LAYER_STEP = 16
SAFETY_FACTOR = 2.0       # the limit is twice the estimate ...
MIN_MINUTES = 10          # ... and never below ten minutes (queueing, slow file systems)


def _matrices(pack: PackSpec) -> list[tuple[int, int]]:
    """(out, in) shapes of every stored matrix of the model (a kernel as [out, in*kh*kw]),
    output layer included."""
    return [layer.shape for layer in pack.layer_table().layers]


def step_flops(specs: Sequence[RunSpec]) -> float:
    """Matrix-multiply FLOPs of one training step of a pack (elementwise work, a few
    FLOPs per activation or parameter, is left out). Per member and example each
    multiply-add (a weight; for a convolution, a weight at each output position) costs
    2 FLOPs forward, 2 for the input gradient and 2 for the weight's gradient; the first
    layer's input gradient is never formed (the data needs none). A pack steps every
    member at the pack's batch size."""
    pack = PackSpec.of(specs, "step_flops")
    layers = pack.layer_table().layers
    per_example = 6 * sum(layer.macs for layer in layers) - 2 * layers[0].macs
    return float(len(pack) * pack.batch_size * per_example)


def step_bytes(specs: Sequence[RunSpec], itemsize: int = 4) -> float:
    """The least memory traffic of one training step, in bytes, for an implementation
    that keeps nothing in cache from one phase to the next: the forward reads every
    parameter (P), the backward reads the weights again for the input gradients (all
    but the first matrix) and writes every gradient once (P), a one-pass SGD update
    reads parameter, gradient and momentum and writes parameter and momentum (5P),
    and the input rows of the batch are read once. Activations (K * B * width per
    layer, under 2% here) are left out: this is a lower bound."""
    pack = PackSpec.of(specs, "step_bytes")
    shapes = _matrices(pack)
    params = pack.layer_table().params
    reread = sum(o * i for o, i in shapes[1:])
    inputs = pack.batch_size * DATASET_DIMS[pack.dataset]
    return float(itemsize * len(pack) * (7 * params + reread + inputs))


def roofline_seconds(flops: float, nbytes: float, flops_per_second: float,
                     bytes_per_second: float) -> float:
    """The roofline bound: a step can be no faster than its FLOPs at the matmul
    throughput, nor than its bytes at the stream bandwidth."""
    return max(flops / flops_per_second, nbytes / bytes_per_second)


# -- measured timings ----------------------------------------------------------------

ENV_TIMINGS = "RANKBIAS_TIMINGS"
DEFAULT_TIMINGS = Path("results") / "gpu-timings.json"
TIMINGS_FORMAT = "rankbias-gpu-timings/1"


@dataclass(frozen=True)
class ShapeTiming:
    """One pack shape measured on a GPU (scripts/gpu_check.py)."""
    step_s: float             # a steady training step, with the stepper training chooses
    logged_epoch_s: float | None   # evaluation, spectra and Theorem 1 at one logged epoch
                                   # (None: not measured; the cost model's stands in)
    setup_s: float = 0.0      # building the pack and choosing (capturing, checking) its step


def shape_key(specs: Sequence[RunSpec]) -> str:
    """What a pack's step and logged-epoch times depend on: the model and its input,
    the data's size, B, K, the loss, the precision and Theorem 1's sampling. Packs with
    one key take one time; learning rates, decays and seeds change none."""
    s = PackSpec.of(specs, "shape_key")
    train, test = s.sizes()
    sizes = ",".join(map(str, s.theory_batch_sizes))
    return (f"{s.model}|{s.dataset}|{s.activation}|bias={s.bias}|{s.loss}|{s.precision}|n={train}/{test}"
            f"|B={s.batch_size}|K={len(s)}|theory={s.theory_batches}x{sizes}")


def load_timings(path: str | os.PathLike | None = None) -> dict[str, ShapeTiming]:
    """The measured timings by shape key: from `path`, else $RANKBIAS_TIMINGS, else
    results/gpu-timings.json; {} where there is no such file. A file that is there but
    unreadable is an error naming it (a silent fall back to the cost model would hide it)."""
    given = path or os.environ.get(ENV_TIMINGS)
    p = Path(given) if given else DEFAULT_TIMINGS
    if not p.exists():
        if given:
            raise SpecError(f"timings file {p} does not exist (from {'--timings' if path else ENV_TIMINGS})")
        return {}
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != TIMINGS_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {TIMINGS_FORMAT!r}")
        out = {}
        for row in doc["shapes"]:
            logged = row.get("logged_epoch_s")
            t = ShapeTiming(float(row["step_s"]), None if logged is None else float(logged),
                            float(row.get("setup_s", 0.0)))
            if not all(math.isfinite(v) and v >= 0 for v in (t.step_s, t.logged_epoch_s, t.setup_s)
                       if v is not None):
                raise ValueError(f"shape {row['key']}: times must be finite and >= 0")
            out[str(row["key"])] = t
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpecError(f"timings file {p}: unreadable ({e}); rerun `make gpu-check` or remove it") from None


def logged_epochs(pack: PackSpec) -> int:
    """The epochs a pack logs (evaluation, spectra, Theorem 1), epoch 0 included."""
    return pack.epochs // pack.log_every + 1


def measured_seconds(specs: Sequence[RunSpec], timing: ShapeTiming, device: str = "cuda") -> float:
    """A pack's wall time from its shape's measured timing: start-up (the cost model's),
    set-up, every step, and every logged epoch (epoch 0 included; the cost model's where
    the logged epoch was not measured)."""
    pack = PackSpec.of(specs, "measured_seconds")
    logged_s = (timing.logged_epoch_s if timing.logged_epoch_s is not None
                else model_logged_epoch_seconds(pack, device))
    return (COST_MODELS[device].startup_seconds + timing.setup_s
            + pack.steps * timing.step_s + logged_epochs(pack) * logged_s)


def estimate_seconds(specs: Sequence[RunSpec], device: str = "cuda",
                     timings: Mapping[str, ShapeTiming] | None = None) -> float:
    """Unpadded estimate of a pack's wall time in seconds (no safety factor): from the
    measured `timings` where they have the pack's shape (CUDA only), else the cost model."""
    if device not in COST_MODELS:
        raise SpecError(f"device: {device!r} is not one of {', '.join(sorted(COST_MODELS))}")
    pack = PackSpec.of(specs, "estimate_runtime_minutes")
    if device == "cuda" and timings:
        timing = timings.get(shape_key(pack))
        if timing is not None:
            return measured_seconds(pack, timing, device)
    return model_seconds(pack, device)


def model_seconds(specs: Sequence[RunSpec], device: str = "cuda") -> float:
    """The cost model's estimate (the module docstring): exact work, assumed rates."""
    pack = PackSpec.of(specs, "model_seconds")
    return (COST_MODELS[device].startup_seconds + model_train_seconds(pack, device)
            + logged_epochs(pack) * model_logged_epoch_seconds(pack, device))


def model_train_seconds(specs: Sequence[RunSpec], device: str = "cuda") -> float:
    """The cost model's seconds of every training step of the pack."""
    cost = COST_MODELS[device]
    pack = PackSpec.of(specs, "model_train_seconds")
    train, _ = pack.sizes()
    n_layers = len(_matrices(pack))

    # Every member sees each sample it trains on once an epoch (all n, or the full
    # batches' with drop_last); each of the steps costs its launches whatever its width.
    samples = pack.epochs * (train // pack.batch_size * pack.batch_size if pack.drop_last else train)
    # step_flops is linear in the batch: a step of B samples costs step_flops, so the
    # epoch's samples cost step_flops * samples / B.
    train_flops = step_flops(pack) * samples / pack.batch_size
    return (train_flops / cost.flops_per_second
            + pack.steps * OPS_PER_LAYER_STEP * n_layers * cost.seconds_per_op)


def model_logged_epoch_seconds(specs: Sequence[RunSpec], device: str = "cuda") -> float:
    """The cost model's seconds of one logged epoch of the pack."""
    cost = COST_MODELS[device]
    pack = PackSpec.of(specs, "model_logged_epoch_seconds")
    k = len(pack)
    train, test = pack.sizes()
    shapes = _matrices(pack)
    n_layers = len(shapes)
    # Each logged epoch (epoch 0 included) evaluates train and test sets and
    # decomposes every matrix of every member.
    eval_flops = 2.0 * sum(layer.macs for layer in pack.layer_table().layers) * (train + test) * k
    eval_batches = math.ceil((train + test) / 1024)
    eval_seconds = eval_flops / cost.flops_per_second + eval_batches * n_layers * 4 * cost.seconds_per_op
    svd_seconds = k * sum(cost.svd_seconds + 4.0 * max(o, i) * min(o, i) ** 2 / cost.svd_flops_per_second
                          for o, i in shapes)
    # Theorem 1, each logged epoch: theory_batches batches of each B* through a forward
    # and backward for every member, and the rank of every matrix's batch gradient.
    batches = pack.theory_batches * len(pack.theory_batch_sizes)
    theory_flops = pack.theory_batches * sum(step_flops(pack) / pack.batch_size * b
                                             for b in pack.theory_batch_sizes)
    theory_seconds = (theory_flops / cost.flops_per_second
                      + batches * (OPS_PER_LAYER_STEP * n_layers * cost.seconds_per_op + svd_seconds))
    return eval_seconds + svd_seconds + theory_seconds


def estimate_runtime_minutes(specs: Sequence[RunSpec], device: str = "cuda",
                             timings: Mapping[str, ShapeTiming] | None = None) -> int:
    """A job time limit in whole minutes for training `specs` as one pack on `device`.

    steps = epochs * steps_per_epoch (ceil(train_size / batch_size), or the floor with
    drop_last; train_size from the dataset, or train_subset when > 0); each step costs
    its FLOPs (6 per multiply-add per example per member: one per weight, and per output
    position for a convolution) at the device's effective throughput plus a per-op
    launch cost; each logged epoch adds a full evaluation pass, one SVD per matrix
    per member, and Theorem 1's measurement (theory_batches batches of each B*, a
    forward and backward and a gradient SVD each); or, with `timings` measured for the
    pack's shape, from those (`measured_seconds`). The total is multiplied by
    SAFETY_FACTOR and is at least MIN_MINUTES.
    """
    seconds = estimate_seconds(list(specs), device, timings)
    return max(MIN_MINUTES, math.ceil(SAFETY_FACTOR * seconds / 60.0))


def estimate_mem_mb(specs: Sequence[RunSpec]) -> int:
    """Host memory for a pack's job, in MiB: the dataset as float32, the pack's weights
    with gradients and momentum, twice over, plus 2 GiB for the interpreter and torch."""
    pack = PackSpec.of(specs, "estimate_mem_mb")
    train, test = pack.sizes()
    data = 4 * (train + test) * DATASET_DIMS[pack.dataset]
    params = 4 * 3 * len(pack) * pack.layer_table().params
    return 2048 + (2 * (data + params)) // 2**20


def check_mem_mb(specs: Sequence[RunSpec], limit_mb: int, limit: str, advice: str) -> None:
    """SpecError, naming the pack and the numbers, when the pack's `estimate_mem_mb` exceeds
    `limit_mb` (`limit` says what that limit is, `advice` what to do). The one memory check:
    `rankbias plan` and the workflow (sweep.check_device_memory) and every path that builds
    a pack (engine.check_pack_memory) run it."""
    pack = PackSpec.of(specs, "check_mem_mb")
    need = estimate_mem_mb(pack)
    if need > limit_mb:
        raise SpecError(f"pack {pack.id} ({len(pack)} x {pack.model} on {pack.dataset}): "
                        f"needs about {need} MiB (rankbias.plan.cluster.estimate_mem_mb), more than {limit}; {advice}")


def host_memory_mb() -> int:
    """This machine's memory in MiB: its physical memory, or its cgroup's limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total // 2**20
