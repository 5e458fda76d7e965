"""Config -> run specs -> deduplicated runs -> packs.

A config holds ``defaults`` (spec keys shared by every figure), one section per
figure (``figures.fig1`` ... ``figures.fig8``) and optional ``extra`` groups of runs
that no figure draws but a claim needs (full-batch GD for C7). Each section is a base
spec (spec keys, ``model`` as e.g. ``MLP-BN-10-100``, ``seeds``) plus a ``grid`` of
the varied keys; its runs are the cartesian product of the grid and the seeds.

Runs are identified by ``run_id`` (a hash of the canonical spec), so a run drawn by
two figures is trained once; runs are then grouped into packs by
``rankbias.core.pack.make_packs``. A pack's id is a hash of its members' run_ids, so a
pack file's content never changes under its name: changing one run's hyperparameter
makes a new pack (and only that pack trains again).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

# Snakemake imports this module on every parse (dry runs, --lint and each SLURM job
# too), so nothing it imports may pull in torch; tests/test_sweep.py checks.
from rankbias.plan.cluster import check_mem_mb
from rankbias.core.io import atomic_write_bytes
from rankbias.core import config
from rankbias.core.pack import PackSpec, make_packs
from rankbias.core.spec import RunSpec, SpecError

if TYPE_CHECKING:
    import yaml

# Which spec key makes the panels and which the lines of each figure, and the group
# (GROUPS) it is shown under in the report.
LAYOUTS: dict[str, dict[str, Any]] = {
    "fig1": {"kind": "dynamics", "panel": None, "line": "weight_decay", "group": "paper"},
    "fig2": {"kind": "rank", "panel": "lr", "line": "batch_size", "group": "paper"},
    "fig3": {"kind": "rank", "panel": "batch_size", "line": "weight_decay", "group": "paper"},
    "fig4": {"kind": "rank", "panel": "lr", "line": "batch_size", "group": "paper"},
    "fig5": {"kind": "rank_acc", "panel": "lr", "line": "batch_size", "group": "paper"},
    "fig6": {"kind": "layers", "panel": "lr", "line": "batch_size", "group": "paper"},
    "fig7": {"kind": "layers", "panel": "lr", "line": "batch_size", "group": "paper"},
    "fig8": {"kind": "rank", "panel": "lr", "line": "batch_size", "group": "paper"},
    # the theory (rankbias.analysis.theory_figures): Lemmas 1-2 and Theorem 1
    "figT1": {"kind": "lemmas", "panel": None, "line": "model", "group": "theory"},
    "figT2": {"kind": "theorem1", "panel": None, "line": "batch_size", "group": "theory"},
}
# Summary figures, drawn whenever the config has a figure section.
SUMMARY: dict[str, str] = {
    "figR": "final rank vs the rank tolerance",
    "figS": "final rank vs B/(eta*lambda)",
}
# The figures' groups, in the order shown, with their titles (the report's subcategories).
GROUPS: dict[str, str] = {"paper": "Paper figures", "theory": "Theory", "summary": "Summaries"}
# Every figure name the pipeline knows (the workflow's `fig` wildcard derives from this).
NAMES: tuple[str, ...] = tuple(LAYOUTS) + tuple(SUMMARY)
# The paper figures a config may have a section for.
FIGURES = tuple(LAYOUTS)
# The keys of a run, a section's and the top level's (rankbias.core.config defines each).
SPEC_KEYS = tuple(config.SPEC) + ("model",)
SECTION_KEYS = tuple(k for k in config.SPEC if k != "seed") + tuple(config.SECTION)
TOP_KEYS = tuple(config.TOP)
# Keys that say how jobs run, not what they compute: the config files jobs read leave
# them out, so switching one redraws nothing, and the train rule takes them as its
# resources and threads, not its params, so it retrains nothing either.
EXECUTION_KEYS = ("device", "graph", "deterministic", "train_threads", "checkpoint_every")


class ConfigError(SpecError):
    """The config is invalid; the message names the key."""


@dataclass
class Plan:
    """Everything the workflow needs from a config, computed once at parse time."""
    config: dict
    specs: dict[str, RunSpec]                 # run_id -> spec (deduplicated)
    groups: dict[str, list[str]]              # figure or extra group -> run_ids (config order)
    packs: dict[str, list[str]] = field(default_factory=dict)   # pack_id -> run_ids
    _packs: dict[str, PackSpec] = field(default_factory=dict, repr=False, compare=False)

    @property
    def figures(self) -> dict[str, list[str]]:
        return {g: ids for g, ids in self.groups.items() if g in FIGURES}

    def pack_specs(self, pid: str) -> PackSpec:
        """The pack `pid` (checked once, when first asked for)."""
        if pid not in self._packs:
            if pid not in self.packs:
                raise ConfigError(f"pack {pid!r} is not in this config's plan")
            self._packs[pid] = PackSpec((self.specs[r] for r in self.packs[pid]), f"pack {pid}")
        return self._packs[pid]

    def pack_of(self) -> dict[str, str]:
        return {r: p for p, ids in self.packs.items() for r in ids}

    def pack_document(self, pid: str) -> dict:
        return {"pack_id": pid, "runs": [s.to_dict() for s in self.pack_specs(pid)]}

    def steps(self, pid: str) -> int:
        """Optimiser steps the pack runs (`PackSpec.steps`)."""
        return self.pack_specs(pid).steps


# -- config ------------------------------------------------------------------------

def load_config(path: str | Path) -> dict:
    """A config file's top-level mapping, YAML (or JSON). Refused, naming the file and
    what was expected: a file that is not UTF-8 text, an empty one, one that is no
    mapping, a tab in YAML's indentation, a key given twice in one mapping (plain YAML
    loaders, Snakemake's included, silently keep the last) and YAML anchors and aliases
    (a few lines of nested aliases expand to billions of values, which an error message
    that prints the config then renders)."""
    import yaml
    path = Path(path)
    where = f"config file {path}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():
        raise ConfigError(f"{where} is not a file; expected YAML or JSON text")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "expected YAML or JSON text in UTF-8") from None
    if "\0" in text:
        raise ConfigError(f"{where}: not a text file (a NUL byte at offset {text.index(chr(0))}); "
                          "expected YAML or JSON text")
    raw = _load_json(where, text) if text.lstrip().startswith("{") else None
    if raw is None:
        try:
            raw = yaml.load(text, Loader=_strict_loader())
        except _Refused as e:
            raise ConfigError(f"{where}, line {e.line}: {e}") from None
        except yaml.YAMLError as e:
            tabbed = [n for n, line in enumerate(text.splitlines(), 1)
                      if "\t" in line[:len(line) - len(line.lstrip())]]
            if tabbed:
                raise ConfigError(f"{where}, line {tabbed[0]}: a tab in the indentation; YAML indents "
                                  "with spaces only") from None
            raise ConfigError(f"{where}: not valid YAML ({e})") from None
    if raw is None:
        raise ConfigError(f"{where} is empty; expected a YAML mapping of top-level keys "
                          f"({', '.join(TOP_KEYS)})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a YAML mapping of top-level keys, got {_kind(raw)}")
    return raw


def _load_json(where: str, text: str) -> dict | None:
    """`text` as JSON (which may indent with tabs, unlike YAML); None if it is not JSON."""
    def pairs(items: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ConfigError(f"{where}: duplicate key(s) {', '.join(map(repr, twice))}")
        return dict(items)

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError:
        return None


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


class _Refused(Exception):
    """A YAML construct the config loader refuses, at a 1-based line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def _strict_loader() -> type[yaml.SafeLoader]:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            # Refused as the parser meets them, before any alias is expanded.
            event = self.peek_event()
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
                raise _Refused(event.start_mark.line + 1, f"YAML anchors and aliases are refused "
                               f"({sign}{anchor}); write each value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}, again at "
                        f"line {key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return StrictLoader


def resolve_config(raw: Mapping[str, Any]) -> dict:
    """Check the top-level keys (rankbias.core.config.TopKeys) and fill in their defaults;
    errors name the key."""
    check_top_level(raw)
    cfg = config.defaults(config.TopKeys)
    for name, v in raw.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **v}
        else:
            cfg[name] = v
    try:
        for name, k in config.TOP.items():
            if k.booleans and isinstance(cfg[name], bool):  # YAML 1.1 (and --config graph=off) read on/off so
                cfg[name] = k.booleans[cfg[name]]
            config.check(k, cfg[name], name)
            cfg[name] = config.coerce(k, cfg[name])
    except SpecError as e:
        raise ConfigError(str(e)) from None
    bad = sorted(set(cfg["figures"]) - set(FIGURES))
    if bad:
        raise ConfigError(f"figures: unknown figure(s) {', '.join(map(repr, bad))}; "
                          f"allowed: {', '.join(FIGURES)}")
    clash = sorted(set(cfg["extra"]) & set(FIGURES))
    if clash:
        raise ConfigError(f"extra: group name(s) {', '.join(clash)} clash with figure names")
    _check_section("defaults", cfg["defaults"], allow_grid=False)
    return cfg


def check_top_level(raw: Any) -> None:
    """A mapping of known top-level keys. The workflow checks this before its schema,
    whose error message would print the whole config."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of keys to values, got {_kind(raw)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(TOP_KEYS)}")


def figure_rank(cfg: Mapping[str, Any], name: str) -> dict:
    """A figure's rank settings: the config's `rank`, then the figure's own `rank`."""
    return {**cfg["rank"], **(cfg["figures"].get(name) or {}).get("rank", {})}


def _check_section(where: str, section: Any, allow_grid: bool = True) -> None:
    """A section's keys, its seeds and its grid's shape (its runs' values are checked by
    RunSpec, grid point by grid point)."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping of spec keys, got {section!r}")
    allowed = set(SECTION_KEYS) | ({"grid"} if allow_grid else set())
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(sorted(allowed))}")
    if "seeds" in section:
        try:
            config.check(config.SECTION["seeds"], section["seeds"], f"{where}.seeds")
        except SpecError as e:
            raise ConfigError(str(e)) from None
        _check_distinct(f"{where}.seeds", section["seeds"])
    if "grid" in section:
        grid = section["grid"]
        if not isinstance(grid, Mapping):
            raise ConfigError(f"{where}.grid: expected a mapping of spec keys to lists, got {grid!r}")
        for k, values in grid.items():
            if k not in SPEC_KEYS:
                raise ConfigError(f"{where}.grid: unknown key {k!r}; allowed keys: "
                                  f"{', '.join(sorted(SPEC_KEYS))}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.grid.{k}: expected a non-empty list, got {values!r}")
            _check_distinct(f"{where}.grid.{k}", values)


def _check_distinct(where: str, values: list) -> None:
    """A value listed twice would plan the same runs twice and draw them as two."""
    seen = set()
    for v in values:
        key = json.dumps(v, sort_keys=True)
        if key in seen:
            raise ConfigError(f"{where}: {v!r} is listed twice; each value must appear once")
        seen.add(key)


def section_specs(where: str, defaults: Mapping, section: Mapping) -> list[RunSpec]:
    """A figure's (or extra group's) runs: defaults, then the section, then each grid point."""
    _check_section(where, section)
    base = {**defaults, **{k: v for k, v in section.items() if k != "grid"}}
    if "model" in section:  # a figure's model name overrides defaults' arch/depth/width
        for k in ("arch", "depth", "width"):
            if k not in section:
                base.pop(k, None)
    seeds = base.pop("seeds", list(config.SECTION["seeds"].default))
    grid = dict(section.get("grid") or {})
    if "seed" in grid:
        seeds = [None]
    keys = list(grid)
    specs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for seed in seeds:
            d = {**base, **point}
            if "model" in point:
                for k in ("arch", "depth", "width"):
                    if k not in point:
                        d.pop(k, None)
            if seed is not None:
                d["seed"] = seed
            try:
                spec = RunSpec.from_dict(d)
                spec.check_sizes()
                specs.append(spec)
            except SpecError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise ConfigError(f"{where}: {e}" + (f" (grid point {shown})" if shown else "")) from None
    return specs


def plan(raw_config: Mapping[str, Any]) -> Plan:
    cfg = resolve_config(raw_config)
    specs: dict[str, RunSpec] = {}
    groups: dict[str, list[str]] = {}
    sections = [(f"figures.{f}", f, cfg["figures"][f]) for f in FIGURES if f in cfg["figures"]]
    sections += [(f"extra.{g}", g, s) for g, s in cfg["extra"].items()]
    for where, name, section in sections:
        section = dict(section or {})
        if name in FIGURES and "rank" in section:      # how the figure reads ranks, no spec key
            try:
                config.check(config.TOP["rank"], section.pop("rank"), f"{where}.rank")
            except SpecError as e:
                raise ConfigError(str(e)) from None
        ids = []
        for s in section_specs(where, cfg["defaults"], section):
            specs.setdefault(s.run_id, s)
            if s.run_id not in ids:
                ids.append(s.run_id)
        groups[name] = ids
    made = {pack.id: pack for pack in make_packs(specs.values(), cfg["max_pack"])}
    return Plan(config=cfg, specs=specs, groups=groups, packs={pid: pack.run_ids for pid, pack in made.items()},
                _packs=made)


def check_device_memory(p: Plan) -> None:
    """Every pack fits the training device (config key device_memory_mb), by
    rankbias.plan.cluster.estimate_mem_mb; checked where training is planned (the workflow,
    `rankbias plan`), not by jobs that only read runs. Every path that builds a pack checks
    it again against the device it trains on (engine.check_pack_memory)."""
    limit = p.config["device_memory_mb"]
    for pid in p.packs:
        try:
            check_mem_mb(p.pack_specs(pid), limit, f"device_memory_mb = {limit}",
                         "use a smaller model or max_pack, or set device_memory_mb to the training device's memory")
        except SpecError as e:
            raise ConfigError(str(e)) from None


def plan_from_file(path: str | Path) -> Plan:
    try:
        return plan(load_config(path))
    except SpecError as e:
        raise ConfigError(f"{path}: {e}") from None


# -- files -------------------------------------------------------------------------

def pack_bytes(p: Plan, pid: str) -> bytes:
    return (json.dumps(p.pack_document(pid), indent=2, sort_keys=True) + "\n").encode()


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly `data` (keeps its mtime,
    so Snakemake sees nothing new). Returns whether it wrote."""

    path = Path(path)
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, data)
    return True


def write_packs(p: Plan, pack_dir: str | Path) -> list[str]:
    """Write every pack file `<pack_dir>/<pack_id>.json` that is missing or differs."""
    return [pid for pid in p.packs if write_if_changed(Path(pack_dir) / f"{pid}.json", pack_bytes(p, pid))]


# -- the config a job reads ----------------------------------------------------------
#
# A job must read the config it was planned with, even if the config file changes or a
# dry run with another config parses the workflow meanwhile. So jobs read config files
# named by the hash of their content (results/config/<digest>.json), written by a rule
# from the planned content: a name never holds two contents, and parsing writes nothing.

# -- the figures a plan draws --------------------------------------------------------

def figure_names(p: Plan) -> list[str]:
    """The figures a plan draws: its configured paper figures, then the summary figures."""
    return list(p.figures) + (list(SUMMARY) if p.figures else [])


def figure_group(name: str) -> str:
    """The title of the group figure `name` belongs to (GROUPS): the report's subcategory."""
    if name in SUMMARY:
        return GROUPS["summary"]
    if name not in LAYOUTS:
        raise ValueError(f"figure: {name!r} is not one of {', '.join(NAMES)}")
    return GROUPS[LAYOUTS[name]["group"]]


def figure_runs(p: Plan, name: str) -> list[str]:
    """The run_ids figure `name` is drawn from: its own section's; figR every paper
    figure's; figS every run of the config."""
    if name in p.figures:
        return list(p.figures[name])
    if name == "figR":
        return list(dict.fromkeys(r for ids in p.figures.values() for r in ids))
    if name == "figS":
        return list(p.specs)
    raise ValueError(f"figure: {name!r} is not configured (figures: {', '.join(figure_names(p)) or 'none'})")


def job_config(cfg: Mapping[str, Any], figure: str | None = None) -> dict:
    """What a job reads of the resolved config `cfg`: all but EXECUTION_KEYS; for a figure,
    only the rank settings, the defaults and its own section, so that editing one
    figure's runs redraws that figure alone."""
    if figure is None:
        return {k: v for k, v in cfg.items() if k not in EXECUTION_KEYS}
    return {"rank": cfg["rank"], "defaults": cfg["defaults"], "figures": {figure: cfg["figures"][figure]}}


def config_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def config_digest(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(config_bytes(doc)).hexdigest()[:12]


def job_configs(p: Plan) -> dict[str | None, dict]:
    """Every config file the workflow's jobs read: None -> the job config (claims, packs),
    figure -> that figure's."""
    configs: dict[str | None, dict] = {None: job_config(p.config)}
    configs.update({f: job_config(p.config, f) for f in p.figures})
    configs.update({f: job_config(p.config) for f in SUMMARY if p.figures})    # every figure's runs
    return configs


def write_configs(p: Plan, config_dir: str | Path) -> list[Path]:
    """Write `job_configs(p)` as <config_dir>/<digest>.json (only those missing or different)."""
    paths = []
    for doc in job_configs(p).values():
        path = Path(config_dir) / f"{config_digest(doc)}.json"
        write_if_changed(path, config_bytes(doc))
        paths.append(path)
    return paths


def summary(p: Plan) -> dict:
    pack_of = p.pack_of()
    figures = {g: {"runs": ids, "packs": sorted({pack_of[r] for r in ids})} for g, ids in p.groups.items()}
    packs = {}
    for pid, ids in p.packs.items():
        pack = p.pack_specs(pid)
        packs[pid] = {"runs": ids, "model": pack.model, "dataset": pack.dataset,
                      "batch_size": [pack.batch_size],     # a list, as the summary has always given it
                      "epochs": pack.epochs, "steps": pack.steps}
    return {"figures": figures, "packs": packs, "runs": len(p.specs),
            "total_steps": sum(p.steps(pid) for pid in p.packs)}


# -- CLI ---------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="show figures -> runs -> packs for a config (and write pack files)",
        description="Expand a config into runs and packs. Prints each figure's runs and each "
                    "pack's size and steps; optionally writes pack files.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="config/config.yaml", help="config file (default: %(default)s)")
    src.add_argument("--config-json", metavar="JSON", help="the config itself, as JSON text")
    src.add_argument("--config-env", metavar="NAME", help="the config as JSON text in the "
                     "environment variable NAME (the workflow's plan job: RANKBIAS_PLANNED_CONFIG, "
                     "which its parse sets to the config it planned)")
    p.add_argument("--expect-config", metavar="DIGEST", help="refuse, writing nothing, unless the "
                   "config plans the job config DIGEST (results/config/DIGEST.json)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write-configs", metavar="DIR", help="write the config files the workflow's "
                   "jobs read, DIR/<digest>.json, each named by the hash of its content")
    p.add_argument("--write-packs", metavar="DIR", help="write every pack file DIR/<pack_id>.json "
                   "(only those missing or different)")
    p.add_argument("--write-pack", metavar="PACK_ID", help="write one pack file to --out")
    p.add_argument("--out", metavar="FILE", help="where --write-pack writes")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.config_env is not None:
        text = os.environ.get(args.config_env)
        if text is None:
            raise ConfigError(f"--config-env {args.config_env}: the environment variable is not set "
                              f"(expected the config as JSON, which the workflow's parse sets)")
        args.config_json, where = text, f"--config-env {args.config_env}"
    else:
        where = "--config-json"
    if args.config_json is not None:
        try:
            doc = json.loads(args.config_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a JSON object (the config), got {_kind(doc)}")
        p = plan(doc)
        args.config = where
    else:
        p = plan_from_file(args.config)
    if args.expect_config is not None:
        got = config_digest(job_configs(p)[None])
        if got != args.expect_config:
            raise ConfigError(f"{args.config}: plans the job config {got}, expected {args.expect_config} "
                              f"(results/config/{args.expect_config}.json); nothing written")
    check_device_memory(p)
    if args.write_configs:
        written = write_configs(p, args.write_configs)
        print(f"wrote {len(written)} config file(s) to {args.write_configs}", file=sys.stderr)
    if args.write_pack:
        if not args.out:
            raise ConfigError("--write-pack needs --out FILE")
        write_if_changed(args.out, pack_bytes(p, args.write_pack))
    if args.write_packs:
        written_packs = write_packs(p, args.write_packs)
        print(f"wrote {len(written_packs)} of {len(p.packs)} pack file(s) to {args.write_packs}", file=sys.stderr)
    s = summary(p)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"{args.config}: {len(s['figures'])} figure(s)/group(s), {s['runs']} unique run(s), "
          f"{len(s['packs'])} pack(s), {s['total_steps']} optimiser steps in all")
    for g, v in s["figures"].items():
        print(f"  {g}: {len(v['runs'])} run(s) in {len(v['packs'])} pack(s)")
    for pid, v in s["packs"].items():
        print(f"  pack {pid}: {len(v['runs'])} x {v['model']} on {v['dataset']}, "
              f"B={','.join(map(str, v['batch_size']))}, {v['epochs']} epochs, {v['steps']} steps")
    return 0
