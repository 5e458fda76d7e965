"""Run specifications: one frozen, validated description of a training run.

A RunSpec is the unit of identity in rankbias: its canonical JSON form is hashed
into ``run_id``, which names the run's output directory and deduplicates runs
across figures. Runs with one `pack_key()` train as one batched model (rankbias.core.pack).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from rankbias.core import config, families
from rankbias.core.config import SpecError, SpecKeys

# The config model (rankbias.core.config) defines every spec key: its type, default and
# what it allows. The names below are its choices and defaults, for the modules that use them.
DATASETS: tuple[str, ...] = config.SPEC["dataset"].choices
# (train, test) examples of each dataset, for checks and estimates made before any data loads.
DATASET_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000),
                 "cifar10": (50000, 10000), "synthetic": (1024, 256)}
# Images as rankbias.train.data delivers them, flattened (MNIST-family images padded to
# 32x32; the synthetic task is CIFAR-shaped), and classes. data.load checks both.
DATASET_SHAPES = {"mnist": (1, 32, 32), "fashion_mnist": (1, 32, 32), "cifar10": (3, 32, 32),
                  "synthetic": (3, 32, 32)}
DATASET_DIMS = {name: math.prod(shape) for name, shape in DATASET_SHAPES.items()}
NUM_CLASSES = 10
# Config choices the planner checks. They live in core, beside the specs, because the
# planner must not import torch (Snakemake imports it on every parse); rankbias.store.metrics
# and rankbias.train.engine use the same tuples.
NORMALISATIONS: tuple[str, ...] = config.RANK["normalise"].choices
DEFAULT_NORMALISE: str = config.RANK["normalise"].default
DEFAULT_TOL: float = config.RANK["tol"].default
# What a rank is: the count of normalised singular values above tol (the paper's), or a
# threshold-free one read off the same spectrum: the effective rank exp H(sigma/sum sigma)
# (Roy & Vetterli 2007) or the stable rank ||W||_F^2 / ||W||_2^2.
MEASURES: tuple[str, ...] = config.RANK["measure"].choices
DEFAULT_MEASURE: str = config.RANK["measure"].default
GRAPH_MODES: tuple[str, ...] = config.TOP["graph"].choices
# Floating-point policy of training (rankbias.train.numerics): fp32, or TF32 matmuls and
# convolutions on GPUs that have them (faster for compute-bound packs; changes results).
PRECISIONS: tuple[str, ...] = config.SPEC["precision"].choices
# Coupled weight decay scales every weight by (1 - lr * weight_decay) each step, before
# the gradient. At lr * weight_decay >= 1 that factor is zero or negative: the "decay"
# overshoots zero and flips every weight's sign each step (and diverges at >= 2), so such
# a run measures nothing the paper speaks of.
MAX_LR_TIMES_WEIGHT_DECAY = 1.0
# Which spectrum stands for a convolution's rank: its kernel reshaped [out, in*kh*kw]
# (the authors' default) or its linear operator on its input (layer kind 'conv_operator').
CONV_SPECTRA: tuple[str, ...] = config.RANK["conv"].choices
DEFAULT_CONV: str = config.RANK["conv"].default


# The keys the runs of a pack share (RunSpec.pack_key; rankbias.core.pack.PackSpec).
PACK_KEYS: tuple[str, ...] = ("dataset", "arch", "depth", "width", "activation", "bias", "loss", "epochs",
                              "batch_size", "drop_last", "schedule", "milestones", "gamma", "log_every",
                              "train_subset", "test_subset", "precision")


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
class RunSpec(SpecKeys):
    """One run: the keys of rankbias.core.config.SpecKeys, each checked and in its canonical
    type (RunSpec(lr=1) and RunSpec.from_dict({"lr": 1.0}) are one run with one run_id)."""

    def __post_init__(self) -> None:
        for name, k in config.SPEC.items():
            config.check(k, getattr(self, name), name)
            object.__setattr__(self, name, config.coerce(k, getattr(self, name)))
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
        """The spec's keys and values; keys added after runs were first stored
        (`omitted="spec"` in the config model) are left out at their default."""
        d = dataclasses.asdict(self)
        for name, k in config.SPEC.items():
            if k.omitted == "spec" and getattr(self, name) == k.default:
                del d[name]
            elif k.kind is tuple:
                d[name] = list(d[name])
        return d

    def canonical_json(self) -> str:
        """What run_id hashes: to_dict less the keys `omitted="run_id"` at their default."""
        d = {name: v for name, v in self.to_dict().items()
             if not (config.SPEC[name].omitted == "run_id" and v == config.SPEC[name].default)}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @functools.cached_property
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
        return tuple(getattr(self, k) for k in PACK_KEYS)

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
        unknown = sorted(set(d) - set(config.SPEC))
        if unknown:
            raise SpecError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                            f"model, {', '.join(sorted(config.SPEC))}")
        return cls(**d)


def _validate(s: RunSpec) -> None:
    """What the keys allow together (each key's own values are checked by config.check)."""
    for name, k in config.SPEC.items():
        if k.order and list(getattr(s, name)) != sorted(set(getattr(s, name))):
            raise SpecError(f"{name}: must be strictly increasing, got {list(getattr(s, name))!r}")
    if s.lr * s.weight_decay >= MAX_LR_TIMES_WEIGHT_DECAY:
        raise SpecError(f"weight_decay: {s.weight_decay!r} with lr {s.lr!r} gives lr * weight_decay = "
                        f"{s.lr * s.weight_decay:g}; it must be below {MAX_LR_TIMES_WEIGHT_DECAY:g} "
                        "(the per-step decay factor 1 - lr * weight_decay must stay positive)")
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
    if families.family(s.arch).batchnorm and any(b < 2 for b in s.theory_sizes):
        raise SpecError("theory_sizes: BatchNorm architectures need B* >= 2")
