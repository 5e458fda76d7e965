"""The config model: every key of a rankbias config, defined once.

Each key is a field of one of the dataclasses below, whose metadata (set by `key`) gives
its meaning and what it allows: choices, bounds, a pattern. Its type is the field's
annotation and its default the field's default. Everything else derives from them:
RunSpec's fields and defaults (rankbias.core.spec subclasses SpecKeys), the checks of
`check` (RunSpec's and the planner's, rankbias.plan.sweep), the top-level defaults, the
JSON schema Snakemake validates a config against and the key tables of config/README.md
(both written by `rankbias schema --write`, rankbias.plan.schema).

    SpecKeys     one run's keys (a RunSpec)
    SectionKeys  what a config section adds: `model` and `seeds`
    RankKeys     `rank` (and a figure's own `rank`): how ranks are read off the spectra
    ClaimKeys    `claims`: the thresholds of the claim verdicts, at their defaults
    TopKeys      the config's top-level keys

Pure Python, torch-free: Snakemake imports the planner on every parse.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from rankbias.core import families


class SpecError(ValueError):
    """A run specification or config is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Key:
    """One config key, read off a field of a key class (`keys`)."""
    name: str
    kind: Any                   # its type: bool, int, float, str, tuple (of ints) or dict
    default: Any
    meaning: str
    choices: tuple = ()
    # Bounds of the value (of each item, for a list): (low, high), each None for none;
    # open_low/open_high leave the bound itself out.
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    items: str = ""             # a list's items, for messages: "epochs"
    min_items: int = 0
    order: str = ""             # a list's canonical order: "sorted", or "set" (sorted, each once)
    pattern: str = ""           # a string's regular expression (the JSON schema's)
    booleans: tuple = ()        # (false, true): the choices YAML 1.1's booleans stand for
    keys: type | None = None    # a mapping of these keys (a key class)
    # Keys added after runs were first stored, left out at their default so that every
    # earlier run keeps its run_id: "spec" (out of the spec's dict, its pack file entry, too)
    # or "run_id" (out of the canonical form only).
    omitted: str = ""

    @property
    def bounds(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)' or ''."""
        if self.high is None:
            return "" if self.low is None else f"{'>' if self.open_low else '>='} {_num(self.low)}"
        low = "-inf" if self.low is None else _num(self.low)
        return f"in {'(' if self.open_low else '['}{low}, {_num(self.high)}{')' if self.open_high else ']'}"

    def within(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or (v < self.high if self.open_high else v <= self.high)))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def key(default: Any, meaning: str, *, within: str = "", **spec: Any) -> Any:
    """A key's field: its default, one-line meaning and what it allows. `within` is an
    interval such as "[0, 1)", "(0, inf)" or "[1, inf)" (of each item, for a list)."""
    if within:
        lo, hi = (s.strip() for s in within[1:-1].split(","))
        spec.update(low=None if lo == "-inf" else float(lo), high=None if hi == "inf" else float(hi),
                    open_low=within[0] == "(", open_high=within[-1] == ")")
    meta = {"meaning": meaning, **spec}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(v: Any) -> Any:
    return {k: _copy(x) for k, x in v.items()} if isinstance(v, dict) else list(v) if isinstance(v, list) else v


def keys(cls: type) -> dict[str, Key]:
    """The keys of a key class, in order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        origin = typing.get_origin(t)
        if origin is tuple:
            t = tuple
        elif origin is dict:
            t = dict
        elif origin is not None:            # Optional[str] (model): the type it holds
            t = next(a for a in typing.get_args(t) if a is not type(None))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out[f.name] = Key(f.name, t, default, **f.metadata)
    return out


def defaults(cls: type) -> dict[str, Any]:
    """{key: default} of a key class."""
    return {k.name: k.default for k in keys(cls).values()}


def check(k: Key, value: Any, where: str) -> None:
    """`value` is a value key `k` allows, or SpecError naming `where` (the key's place in
    the config) and what was expected. Types first, then choices and bounds (a model
    name's form is checked by parsing it, rankbias.core.families.parse_model_name)."""
    if k.kind is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
    elif k.kind is int:
        if not _integral(value):
            raise SpecError(f"{where}: expected an integer, got {value!r}")
    elif k.kind is float:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and math.isfinite(value)):
            raise SpecError(f"{where}: expected a finite number, got {value!r}")
    elif k.kind is tuple:
        if (isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple))
                or len(value) < k.min_items
                or any(not _integral(v) or not k.within(v) for v in value)):
            what = f"a{' non-empty' if k.min_items else ''} list of integers{' ' + k.bounds if k.bounds else ''}"
            raise SpecError(f"{where}: expected {what} ({k.items}), got {value!r}")
        return
    elif k.kind is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {value!r}")
        if k.keys is not None:
            check_mapping(k.keys, value, where)
        return
    if k.choices and value not in k.choices:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(k.choices)}")
    if k.kind is str and not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, got {value!r}")
    if (k.low is not None or k.high is not None) and not k.within(value):
        raise SpecError(f"{where}: must be {k.bounds}, got {value!r}")


def _integral(v: Any) -> bool:
    """An integer, or a float with an integer's value (JSON schema's integers; YAML's 1.0)."""
    return not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and v.is_integer())


def check_mapping(cls: type, value: Any, where: str) -> None:
    """A mapping of some of `cls`'s keys, each a value it allows."""
    allowed = keys(cls)
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise SpecError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {value!r}")
    for name, v in value.items():
        check(allowed[name], v, f"{where}.{name}")


def coerce(k: Key, value: Any) -> Any:
    """A spec value in its canonical type, so that equal runs hash equally (lr=1 and
    lr=1.0 are one run; milestones in order): call after `check`."""
    if k.kind is int and isinstance(value, float):
        return int(value)
    if k.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if k.kind is tuple:
        items = [int(v) for v in value]
        return tuple(sorted(set(items)) if k.order == "set" else sorted(items) if k.order else items)
    return value


# -- one run -----------------------------------------------------------------------

@dataclass(frozen=True)
class SpecKeys:
    """The keys of one run (rankbias.core.spec.RunSpec)."""
    dataset: str = key("mnist", "`mnist`, `fashion_mnist`, `cifar10` or `synthetic` (generated, no download)",
                       choices=("mnist", "fashion_mnist", "cifar10", "synthetic"))
    arch: str = key("mlp_bn", "the architecture family (`model` sets it)", choices=families.ARCHS)
    depth: int = key(5, "hidden layers (MLP), residual blocks (ResNet) or convolutions (ConvNet)",
                     within="[0, inf)")
    width: int = key(100, "hidden width (channels of a ConvNet)", within="[1, inf)")
    activation: str = key("relu", "`relu` or `leaky_relu` (slope 0.01, the authors' default)",
                          choices=families.ACTIVATIONS, omitted="run_id")
    bias: bool = key(True, "whether the layers have biases (false drops every bias; BatchNorm's shift stays)",
                     omitted="run_id")
    loss: str = key("ce", "`ce` (cross-entropy) or `mse`", choices=("ce", "mse"))
    batch_size: int = key(32, "minibatch size B", within="[1, inf)")
    drop_last: bool = key(False, "`false`: an epoch's last n mod B samples are one more, smaller batch (as a "
                                 "DataLoader and the authors' code keep them); `true`: they sit the epoch out")
    lr: float = key(0.1, "learning rate", within="(0, inf)")
    momentum: float = key(0.9, "SGD momentum", within="[0, 1)")
    weight_decay: float = key(5e-4, "weight decay lambda (coupled; lr * weight_decay must stay below 1)",
                              within="[0, inf)")
    schedule: str = key("constant", "learning-rate schedule: `constant` or `multistep`",
                        choices=("constant", "multistep"))
    milestones: tuple[int, ...] = key(
        (), "epochs, counted from 1, from which `multistep` multiplies the learning rate by `gamma` (torch's "
            "MultiStepLR stepped with the epoch before each one, as the authors do)",
        within="[1, inf)", items="epochs", order="sorted")
    gamma: float = key(0.2, "the `multistep` factor", within="(0, 1]")
    epochs: int = key(20, "training epochs", within="[1, inf)")
    seed: int = key(0, "the run's seed (a section lists `seeds`)", within="[0, inf)")
    log_every: int = key(1, "epochs between stored spectra and metrics", within="[1, inf)")
    train_subset: int = key(0, "class-balanced training subset size (0: the whole set)", within="[0, inf)")
    test_subset: int = key(0, "test subset size (0: the whole set)", within="[0, inf)")
    # Theorem 1 measured during training (rankbias.train.theory): they change no training,
    # only what is measured.
    theory_batches: int = key(32, "batches S of size B* sampled per logged epoch to measure Theorem 1",
                              within="[1, inf)", omitted="spec")
    theory_sizes: tuple[int, ...] = key(
        (), "the B* values Theorem 1 is measured at (`[]`: the run's own `batch_size`)",
        within="[1, inf)", items="batch sizes", order="set", omitted="spec")
    precision: str = key("fp32", "`fp32`, or `tf32`: TF32 matmuls and convolutions on GPUs that have them "
                                 "(faster for compute-bound packs; changes results, so a `tf32` run has its own "
                                 "run_id)", choices=("fp32", "tf32"), omitted="spec")
    label_noise: float = key(
        0.0, "probability that a sample's training label is replaced, at each step it is in, by a class drawn "
             "uniformly from all classes (its own included, so it changes with probability p (C-1)/C); drawn per "
             "run from its seed and the epoch, so resumes and the reference loop draw alike; accuracies and "
             "losses are measured on the true labels (check R3; `0`, none, is left out of the run_id)",
        within="[0, 1)", omitted="spec")


@dataclass(frozen=True)
class SectionKeys:
    """What a config section (`defaults`, `figures.figN`, `extra.NAME`) adds to SpecKeys
    (all but `seed`; a section's `grid` may vary `seed`)."""
    model: str | None = key(None, f"{families.name_forms()} (L depth, W width, any case); sets `arch`, "
                                  "`depth`, `width`", pattern=families.name_pattern())
    seeds: tuple[int, ...] = key((0,), "seeds of every grid point", within="[0, inf)", items="seeds",
                                 min_items=1)


# -- the top level ------------------------------------------------------------------

@dataclass(frozen=True)
class RankKeys:
    """How ranks are read off the stored spectra (the config's `rank`, a figure's own)."""
    # The authors' code divides W by its Frobenius norm and counts sigma > 1e-3; the
    # measured trends in NOTES.md use the same.
    measure: str = key("threshold", "what a rank is: `threshold`, the count of singular values above `tol` "
                                    "after `normalise` (the paper's); `effective`, the effective rank "
                                    "exp H(σ/Σσ) (Roy & Vetterli 2007); `stable`, the stable rank ‖W‖_F²/‖W‖₂² "
                                    "(the last two ignore `normalise` and `tol`)",
                       choices=("threshold", "effective", "stable"))
    normalise: str = key("fro", "what W is divided by before `tol` applies: its Frobenius norm, its largest "
                                "singular value or nothing", choices=("fro", "max", "none"))
    tol: float = key(1e-3, "singular values above it count", within="(0, inf)")
    conv: str = key("kernel", "a convolution's rank: its kernel [out, in*kh*kw] or its operator on its input",
                    choices=("kernel", "operator"))


@dataclass(frozen=True)
class ClaimKeys:
    """The thresholds of the claim verdicts (rankbias.analysis.claims), at their defaults."""
    min_spearman: float = key(0.5, "C1-C3: mean Spearman correlation (right sign) over non-flat groups",
                              within="[0, inf)")
    flat: float = key(0.02, "C1-C3: relative range of final ranks below which a group is flat", within="[0, inf)")
    c3_lambda0_ratio: float = key(0.9, "C3: with lambda = 0, final rank >= this x initial rank", within="[0, inf)")
    c4_min_ratio: float = key(2.0, "C4: late d(W_t, W_t+1) with lambda > 0 >= this x the lambda = 0 one",
                              within="[0, inf)")
    c4_min_persist: float = key(0.5, "C4: with lambda > 0, late d >= this x d in the second quarter",
                                within="[0, inf)")
    c5_low_rank: float = key(0.5, "C5: relative rank below this counts as very low", within="[0, inf)")
    c5_high_rank: float = key(0.9, "C5: relative rank at least this counts as high", within="[0, inf)")
    c5_acc_drop: float = key(0.01, "C5: low-rank runs' train accuracy lower by at least this", within="[0, inf)")
    c5_gap_margin: float = key(0.02, "C5: generalisation gaps of very low and high rank differ by at most this",
                               within="[0, inf)")
    c6_min_reduction: float = key(0.9, "C6: only runs whose relative rank fell below this are judged",
                                  within="[0, inf)")
    c6_bottleneck: float = key(0.9, "C6: MLP middle-layer minimum <= this x min(first, last hidden)",
                               within="[0, inf)")
    c6_balance: float = key(0.5, "C6: ResNet min/max of per-block ranks >= this", within="[0, inf)")
    c6_min_fraction: float = key(0.5, "C6: fraction of judged runs that must show the pattern", within="[0, inf)")
    c7_ratio: float = key(0.9, "C7: full-batch GD final rank >= this x initial rank", within="[0, inf)")
    c7_tiny_data: float = key(1000, "C7: training sets smaller than this are 'tiny' (exempt)", within="[0, inf)")
    r1_strongest: float = key(0.25, "R1: each seed's fraction of weight-decay runs with the lowest relative rank",
                              within="(0, 1]")
    r2_max_distance: float = key(1.0e-4, "R2: late d(W_t, W_t+1) at most this: at rest (stationary)",
                                 within="[0, inf)")
    r2_flat: float = key(0.5, "R2: ... or flattened: late d >= this x d a tenth of the epochs before",
                         within="[0, inf)")
    r2_max_shrink: float = key(0.5, "R2: ... and <= this x the weight decay's own shrink per epoch, "
                                    "lr x weight decay / (1 - momentum)", within="[0, inf)")
    r2_min_reduction: float = key(0.1, "R2: rank reduction 1 - final/initial rank at least this",
                                  within="[0, inf)")
    r3_min_reduction: float = key(0.05, "R3: label noise lowers the final rank by at least this fraction of "
                                         "its twin's", within="[0, inf)")
    ci_level: float = key(0.95, "all: coverage of the Student t interval of each effect", within="(0, 1)")
    min_seeds: int = key(3, "all: fewer seeds give no interval and the verdict 'insufficient'", within="[2, inf)")


@dataclass(frozen=True)
class TopKeys:
    """The config's top-level keys."""
    device: str = key("auto", "`cpu`, `cuda` or `auto` (cuda when available); with `cuda` each training job "
                              "asks for one GPU", choices=("auto", "cpu", "cuda"))
    graph: str = key("auto", "CUDA graph for the training step: `auto` (captured, checked and kept where "
                             "faster), `on`, `off` (YAML's unquoted on/off read as true/false count as on/off)",
                     choices=("auto", "on", "off"), booleans=("off", "on"))
    deterministic: bool = key(True, "deterministic CUDA kernels (cuDNN's, cuBLAS's workspace, "
                                    "`torch.use_deterministic_algorithms`), so a GPU run and its resume are "
                                    "bit-identical; an op with none is an error naming it; `false` allows the "
                                    "faster nondeterministic ones (changing it retrains nothing)")
    max_pack: int = key(64, "most runs trained together as one batched model (one job)", within="[1, inf)")
    train_threads: int = key(1, "CPU threads of each training job", within="[1, inf)")
    checkpoint_every: int = key(5, "epochs between a training job's checkpoints (changing it retrains nothing)",
                                within="[1, inf)")
    # One 40 GB A100, the smallest data-centre GPU the paper profile is meant for.
    device_memory_mb: int = key(40960, "memory in MiB of the device a pack trains on: a pack whose estimate "
                                       "(rankbias.plan.cluster.estimate_mem_mb) exceeds it is refused before "
                                       "any job starts", within="[1, inf)")
    rank: dict[str, Any] = key(defaults(RankKeys), "how ranks are read off the stored spectra (the `rank` "
                                                   "keys below); a figure's own `rank` overrides it; changing "
                                                   "it redraws, never retrains", keys=RankKeys)
    defaults: dict[str, Any] = key({}, "spec keys (below) every figure and extra group starts from")
    figures: dict[str, Any] = key({}, "a section per figure to draw, by the figure's name (figR and figS are "
                                      "drawn from them)")
    extra: dict[str, Any] = key({}, "named sections of runs no figure draws but a claim needs (e.g. full-batch "
                                    "GD for C7)")
    claims: dict[str, Any] = key({}, "thresholds of the claim verdicts, by name, over their defaults (the "
                                     "`claims` keys below)", keys=ClaimKeys)


SPEC = keys(SpecKeys)
SECTION = keys(SectionKeys)
RANK = keys(RankKeys)
CLAIMS = keys(ClaimKeys)
TOP = keys(TopKeys)
