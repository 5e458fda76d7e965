"""Run specifications: one frozen, validated description of a training run.

A RunSpec is the unit of identity in rankbias: its canonical JSON form is hashed
into ``run_id``, which names the run's output directory and deduplicates runs
across figures. Packs group runs that can train as one batched model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from rankbias.core import families

DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
# (train, test) examples of each dataset, for checks and estimates made before any data loads.
DATASET_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000),
                 "cifar10": (50000, 10000), "synthetic": (1024, 256)}
# Images as rankbias.train.data delivers them, flattened (MNIST-family images padded to
# 32x32; the synthetic task is CIFAR-shaped), and classes. data.load checks both.
DATASET_SHAPES = {"mnist": (1, 32, 32), "fashion_mnist": (1, 32, 32), "cifar10": (3, 32, 32),
                  "synthetic": (3, 32, 32)}
DATASET_DIMS = {name: math.prod(shape) for name, shape in DATASET_SHAPES.items()}
NUM_CLASSES = 10
LOSSES = ("ce", "mse")
SCHEDULES = ("constant", "multistep")
# Keys added after runs were first stored: at their default they are left out of a
# spec's canonical form, so every earlier run keeps its run_id.
LATER_KEYS = {"activation": "relu", "bias": True}
# Config choices the planner checks. They live here, beside the specs, because the
# planner must not import torch (Snakemake imports it on every parse); rankbias.store.metrics
# and rankbias.train.engine use the same tuples.
NORMALISATIONS = ("fro", "max", "none")
# The authors' code divides W by its Frobenius norm and counts sigma > 1e-3; the
# measured trends in NOTES.md use the same, so it is the default.
DEFAULT_NORMALISE = "fro"
DEFAULT_TOL = 1e-3
# What a rank is: the count of normalised singular values above tol (the paper's), or a
# threshold-free one read off the same spectrum: the effective rank exp H(sigma/sum sigma)
# (Roy & Vetterli 2007) or the stable rank ||W||_F^2 / ||W||_2^2.
MEASURES = ("threshold", "effective", "stable")
DEFAULT_MEASURE = "threshold"
GRAPH_MODES = ("auto", "on", "off")
# Floating-point policy of training (rankbias.train.numerics): fp32, or TF32 matmuls and
# convolutions on GPUs that have them (faster for compute-bound packs; changes results).
PRECISIONS = ("fp32", "tf32")
# Coupled weight decay scales every weight by (1 - lr * weight_decay) each step, before
# the gradient. At lr * weight_decay >= 1 that factor is zero or negative: the "decay"
# overshoots zero and flips every weight's sign each step (and diverges at >= 2), so such
# a run measures nothing the paper speaks of.
MAX_LR_TIMES_WEIGHT_DECAY = 1.0
# Which spectrum stands for a convolution's rank: its kernel reshaped [out, in*kh*kw]
# (the authors' default) or its linear operator on its input (layer kind 'conv_operator').
CONV_SPECTRA = ("kernel", "operator")
DEFAULT_CONV = "kernel"


class SpecError(ValueError):
    """A run specification is invalid; the message names the key and what is allowed."""


def parse_model_name(name: str) -> tuple[str, int, int]:
    """'MLP-BN-10-100' -> ('mlp_bn', 10, 100); 'VGG-16' -> ('vgg16', 16, 64)."""
    try:
        return families.parse_model_name(name)
    except families.ModelError as e:
        raise SpecError(str(e)) from None


def model_name(arch: str, depth: int, width: int) -> str:
    """('mlp_bn', 10, 100) -> 'MLP-BN-10-100'."""
    try:
        return families.model_name(arch, depth, width)
    except families.ModelError as e:
        raise SpecError(str(e)) from None


@dataclass(frozen=True)
class RunSpec:
    dataset: str = "mnist"
    arch: str = "mlp_bn"
    depth: int = 5
    width: int = 100
    activation: str = "relu"
    bias: bool = True
    loss: str = "ce"
    batch_size: int = 32
    drop_last: bool = False
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    epochs: int = 20
    seed: int = 0
    log_every: int = 1
    train_subset: int = 0
    test_subset: int = 0
    # Theorem 1 measured during training (rankbias.train.theory): batches sampled per B* and
    # the B* values; () means the run's own batch size. They change no training, only
    # what is measured, so they leave the run_id alone at their defaults (OMITTED_AT_DEFAULT).
    theory_batches: int = 32
    theory_sizes: tuple[int, ...] = ()
    # PRECISIONS; it changes results, so a tf32 run has a run_id of its own (fp32 is
    # left out of the spec, so every earlier run keeps its run_id).
    precision: str = "fp32"
    # Label noise (check R3): at every step each sample of the batch keeps its label with
    # probability 1 - label_noise, else gets a class drawn uniformly from all classes (its
    # own included). Per member, so a pack may mix values; 0 (no noise) is left out of the
    # spec, so every earlier run keeps its run_id.
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        # RunSpec(lr=1) and RunSpec.from_dict({"lr": 1}) must be one run with one run_id.
        for key in _FLOAT_KEYS:
            v = getattr(self, key)
            if isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, key, float(v))
        for key in ("milestones", "theory_sizes"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _validate(self)

    def sizes(self) -> tuple[int, int]:
        """(train, test) examples this run uses."""
        train, test = DATASET_SIZES[self.dataset]
        return self.train_subset or train, self.test_subset or test

    def layer_table(self) -> families.LayerTable:
        """The model's stored matrices, multiply-adds and parameters on this run's dataset
        (`rankbias.core.families.layers`, computed without torch)."""
        return families.layers(self.arch, self.depth, self.width, self.bias,
                               DATASET_SHAPES[self.dataset], NUM_CLASSES)

    def check_sizes(self) -> None:
        """Subsets, batch size and the model fit the dataset (checked before any job starts)."""
        try:
            self.layer_table()
        except families.ModelError as e:
            raise SpecError(f"{e} (dataset {self.dataset})") from None
        train, test = DATASET_SIZES[self.dataset]
        if self.train_subset > train:
            raise SpecError(f"train_subset: {self.train_subset} exceeds the {train} training examples of {self.dataset}")
        if self.test_subset > test:
            raise SpecError(f"test_subset: {self.test_subset} exceeds the {test} test examples of {self.dataset}")
        self.check_batches(self.sizes()[0], f" this run uses ({self.dataset}, train_subset={self.train_subset})")

        for b in self.theory_sizes:
            if b > self.sizes()[0]:
                raise SpecError(f"theory_sizes: B*={b} exceeds the {self.sizes()[0]} training "
                                f"examples this run uses ({self.dataset}, train_subset={self.train_subset})")

    @property
    def theory_batch_sizes(self) -> tuple[int, ...]:
        """The B* values Theorem 1 is measured at: theory_sizes, else the run's own B."""
        return self.theory_sizes or (self.batch_size,)

    def check_batches(self, n: int, where: str = "") -> None:
        """An epoch over n samples cuts into batches this run can train on."""
        if self.batch_size > n:
            raise SpecError(f"batch_size: {self.batch_size} exceeds the {n} training examples{where}")
        if families.family(self.arch).batchnorm and not self.drop_last and n % self.batch_size == 1:
            raise SpecError(f"batch_size: {self.batch_size} leaves a last batch of 1 of the {n} training "
                            f"examples{where}, and BatchNorm cannot train on one sample; choose another "
                            "batch_size or set drop_last: true")

    def steps_per_epoch(self, n: int | None = None) -> int:
        """Optimiser steps in one epoch over n training samples (default: this run's):
        the batches a DataLoader(batch_size=B, drop_last=drop_last) yields, n // B full
        ones and, unless drop_last, the n mod B samples left over as one more."""
        n = self.sizes()[0] if n is None else n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- identity -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["theory_sizes"] = list(self.theory_sizes)
        for key, default in OMITTED_AT_DEFAULT.items():
            if d[key] == default:
                del d[key]
        return d

    def canonical_json(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if not (k in LATER_KEYS and v == LATER_KEYS[k])}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @property
    def model(self) -> str:
        return model_name(self.arch, self.depth, self.width)

    def pack_key(self) -> tuple:
        """Runs with equal pack keys can train together as one batched model.

        Learning rate, momentum, weight decay, label noise and seed are per member. Batch size is
        shared: in a mixed pack the smallest batch would set the step count and the
        largest the width of every step, so B=8 beside B=128 would cost 16x the compute
        of training them apart; with one B every member's last partial batch has
        n mod B rows, a plain narrower step.
        """
        return (self.dataset, self.arch, self.depth, self.width, self.activation, self.bias,
                self.loss, self.epochs, self.batch_size, self.drop_last, self.schedule,
                self.milestones, self.gamma, self.log_every, self.train_subset, self.test_subset, self.precision)

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based training epoch `epoch`.

        A milestone m is an epoch counted from 1: the lr is multiplied by gamma from
        the m-th epoch on, i.e. from 0-based epoch m - 1. That is what the authors'
        loop gets from torch's MultiStepLR by calling `scheduler.step(epoch)` with
        epoch = 1, 2, ... before each epoch's training (their lr drops during the
        60th, 100th and 200th epochs). The more common `scheduler.step()` after each
        epoch drops it one epoch later; milestones m + 1 give that timing.
        """
        if self.schedule == "constant":
            return self.lr
        drops = sum(1 for m in self.milestones if epoch + 1 >= m)
        return self.lr * self.gamma ** drops

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RunSpec":
        if not isinstance(raw, Mapping):
            raise SpecError(f"run spec must be a mapping of keys to values, got {type(raw).__name__}")
        d = dict(raw)
        if "model" in d:
            arch, depth, width = parse_model_name(d.pop("model"))
            for key, val in (("arch", arch), ("depth", depth), ("width", width)):
                if key in d and d[key] != val:
                    raise SpecError(f"{key}: {d[key]!r} contradicts model name ({key}={val!r})")
                d[key] = val
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                            f"model, {', '.join(sorted(known))}")
        return cls(**{k: _coerce(k, v) for k, v in d.items()})


_INT_KEYS = {"depth", "width", "batch_size", "epochs", "seed", "log_every",
             "train_subset", "test_subset", "theory_batches"}
# Keys added after results were first stored: absent from a spec at their default, so
# every earlier run keeps its run_id.
OMITTED_AT_DEFAULT: dict[str, Any] = {"theory_batches": 32, "theory_sizes": [], "precision": "fp32",
                                       "label_noise": 0.0}
_FLOAT_KEYS = {"lr", "momentum", "weight_decay", "gamma", "label_noise"}
_BOOL_KEYS = {"drop_last", "bias"}


def _coerce(key: str, value: Any) -> Any:
    """Normalise types so that equal runs hash equally (lr=1 and lr=1.0 are one run)."""
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"{key}: expected an integer, got {value!r}")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if key in ("milestones", "theory_sizes"):
        what = "epochs" if key == "milestones" else "batch sizes"
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise SpecError(f"{key}: expected a list of {what}, got {value!r}")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"{key}: expected integer {what}, got {v!r}")
            out.append(v)
        return tuple(sorted(set(out))) if key == "theory_sizes" else tuple(sorted(out))
    return value


def _validate(s: RunSpec) -> None:
    def choice(key, allowed):
        if getattr(s, key) not in allowed:
            raise SpecError(f"{key}: {getattr(s, key)!r} is not one of {', '.join(allowed)}")

    choice("dataset", DATASETS)
    choice("arch", families.ARCHS)
    choice("activation", families.ACTIVATIONS)
    choice("loss", LOSSES)
    choice("schedule", SCHEDULES)
    choice("precision", PRECISIONS)
    for key in _INT_KEYS:
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{key}: expected an integer, got {v!r}")
    for key in _BOOL_KEYS:
        if not isinstance(getattr(s, key), bool):
            raise SpecError(f"{key}: expected true or false, got {getattr(s, key)!r}")
    for key in ("width", "batch_size", "epochs", "log_every", "theory_batches"):
        if getattr(s, key) < 1:
            raise SpecError(f"{key}: must be >= 1, got {getattr(s, key)!r}")
    for key in ("depth", "seed", "train_subset", "test_subset"):
        if getattr(s, key) < 0:
            raise SpecError(f"{key}: must be >= 0, got {getattr(s, key)!r}")
    for key in _FLOAT_KEYS:
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise SpecError(f"{key}: expected a finite number, got {v!r}")
    if not s.lr > 0:
        raise SpecError(f"lr: must be > 0, got {s.lr!r}")
    if not 0 <= s.momentum < 1:
        raise SpecError(f"momentum: must be in [0, 1), got {s.momentum!r}")
    if s.weight_decay < 0:
        raise SpecError(f"weight_decay: must be >= 0, got {s.weight_decay!r}")
    if s.lr * s.weight_decay >= MAX_LR_TIMES_WEIGHT_DECAY:
        raise SpecError(f"weight_decay: {s.weight_decay!r} with lr {s.lr!r} gives lr * weight_decay = "
                        f"{s.lr * s.weight_decay:g}; it must be below {MAX_LR_TIMES_WEIGHT_DECAY:g} "
                        "(the per-step decay factor 1 - lr * weight_decay must stay positive)")
    if not 0 <= s.label_noise < 1:
        raise SpecError(f"label_noise: must be in [0, 1) (the probability that a sample's label "
                        f"is redrawn at a step), got {s.label_noise!r}")
    if not 0 < s.gamma <= 1:
        raise SpecError(f"gamma: must be in (0, 1], got {s.gamma!r}")
    if not isinstance(s.milestones, tuple):
        raise SpecError(f"milestones: expected a tuple of epochs, got {s.milestones!r}")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in s.milestones):
        raise SpecError(f"milestones: expected positive integer epochs, got {list(s.milestones)!r}")
    if list(s.milestones) != sorted(set(s.milestones)):
        raise SpecError(f"milestones: must be strictly increasing, got {list(s.milestones)!r}")
    if s.schedule == "constant" and s.milestones:
        raise SpecError("milestones: only allowed with schedule 'multistep'")
    if s.schedule == "multistep" and not s.milestones:
        raise SpecError("milestones: schedule 'multistep' needs at least one milestone epoch")
    late = [m for m in s.milestones if m >= s.epochs]
    if late:
        raise SpecError(f"milestones: {late!r} not before the last epoch (epochs {s.epochs}): the "
                        f"learning rate drops at the start of 0-based epoch m, so each must be < {s.epochs}")
    if s.batch_size == 1 and families.family(s.arch).batchnorm:
        raise SpecError("batch_size: BatchNorm architectures need batch_size >= 2")
    try:
        families.check_sizes(s.arch, s.depth, s.width)
    except families.ModelError as e:
        raise SpecError(str(e)) from None
    if not isinstance(s.theory_sizes, tuple) or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in s.theory_sizes):
        raise SpecError(f"theory_sizes: expected positive integer batch sizes B*, got {s.theory_sizes!r}")
    if list(s.theory_sizes) != sorted(set(s.theory_sizes)):
        raise SpecError(f"theory_sizes: must be strictly increasing, got {list(s.theory_sizes)!r}")
    if families.family(s.arch).batchnorm and any(b < 2 for b in s.theory_sizes):
        raise SpecError("theory_sizes: BatchNorm architectures need B* >= 2")


# -- packs -----------------------------------------------------------------------

def pack_id(specs: Iterable[RunSpec]) -> str:
    ids = sorted(s.run_id for s in specs)
    return hashlib.sha256(",".join(ids).encode()).hexdigest()[:12]


def make_packs(specs: Iterable[RunSpec], max_pack: int = 64) -> list[list[RunSpec]]:
    """Deduplicate runs by run_id and group them into packs.

    Runs in a pack share `RunSpec.pack_key()`; the rest are per-member hyperparameters.
    """
    unique = {s.run_id: s for s in specs}
    groups: dict[tuple, list[RunSpec]] = {}
    for s in sorted(unique.values(), key=lambda s: s.run_id):
        groups.setdefault(s.pack_key(), []).append(s)
    packs = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        for i in range(0, len(members), max_pack):
            packs.append(members[i:i + max_pack])
    return packs


def load_pack(path: str | Path) -> list[RunSpec]:
    """Read a pack file: JSON or YAML, either a list of specs or {"runs": [...]}."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"pack file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"pack file {path}: not valid JSON ({e})") from None
    if isinstance(raw, Mapping):
        if "runs" not in raw:
            raise SpecError(f"pack file {path}: expected a list of run specs or a mapping with key 'runs'")
        raw = raw["runs"]
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"pack file {path}: expected a non-empty list of run specs")
    specs = []
    for i, r in enumerate(raw):
        try:
            specs.append(RunSpec.from_dict(r))
        except SpecError as e:
            raise SpecError(f"pack file {path}, run {i}: {e}") from None
    check_pack(specs, f"pack file {path}")
    return specs


def check_pack(specs: list[RunSpec], where: str) -> None:
    """Runs can train as one pack only if each is listed once (a run listed twice would
    train as two members into one run directory) and they share `RunSpec.pack_key()`."""
    first: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.run_id in first:
            raise SpecError(f"{where}: run {s.run_id} is listed twice (runs {first[s.run_id]} and {i}); "
                            "a pack lists each run once")
        first[s.run_id] = i
    if len({s.pack_key() for s in specs}) > 1:
        raise SpecError(f"{where}: the runs of a pack must share dataset, architecture, activation, "
                        "bias, loss, epochs, batch_size, drop_last, schedule, log_every and "
                        "subsets; these differ and cannot train as one pack")


def pack_steps(specs: list[RunSpec]) -> int:
    """Optimiser steps a pack runs: epochs * steps_per_epoch, which its members share."""
    return specs[0].epochs * specs[0].steps_per_epoch()
