"""Config -> run specs -> deduplicated runs -> packs.

A config holds ``defaults`` (spec keys shared by every figure), one section per
figure (``figures.fig1`` ... ``figures.fig7``) and optional ``extra`` groups of runs
that no figure draws but a claim needs (full-batch GD for C7). Each section is a base
spec (spec keys, ``model`` as e.g. ``MLP-BN-10-100``, ``seeds``) plus a ``grid`` of
the varied keys; its runs are the cartesian product of the grid and the seeds.

Runs are identified by ``run_id`` (a hash of the canonical spec), so a run drawn by
two figures is trained once; runs are then grouped into packs by
``rankbias.spec.make_packs``. A pack's id is a hash of its members' run_ids, so a
pack file's content never changes under its name: changing one run's hyperparameter
makes a new pack (and only that pack trains again).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import metrics as M
from .engine import GRAPH_MODES
from .results import atomic_write_bytes
from .spec import RunSpec, SpecError, make_packs, pack_id, pack_steps

FIGURES = tuple(f"fig{i}" for i in range(1, 8))
DEVICES = ("auto", "cpu", "cuda")

SPEC_KEYS = tuple(RunSpec.__dataclass_fields__) + ("model",)
SECTION_KEYS = tuple(k for k in SPEC_KEYS if k != "seed") + ("seeds",)

# Defaults of the top-level keys (workflow/schemas/config.schema.yaml states the same).
TOP_DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "graph": "auto",
    "max_pack": 64,
    "train_threads": 1,
    "rank": {"normalise": M.DEFAULT_NORMALISE, "tol": M.DEFAULT_TOL},
    "defaults": {},
    "figures": {},
    "extra": {},
    "claims": {},
}
TOP_KEYS = tuple(TOP_DEFAULTS)


class ConfigError(SpecError):
    """The config is invalid; the message names the key."""


@dataclass
class Plan:
    """Everything the workflow needs from a config, computed once at parse time."""
    config: dict
    specs: dict[str, RunSpec]                 # run_id -> spec (deduplicated)
    groups: dict[str, list[str]]              # figure or extra group -> run_ids (config order)
    packs: dict[str, list[str]] = field(default_factory=dict)   # pack_id -> run_ids

    @property
    def figures(self) -> dict[str, list[str]]:
        return {g: ids for g, ids in self.groups.items() if g in FIGURES}

    def pack_specs(self, pid: str) -> list[RunSpec]:
        try:
            return [self.specs[r] for r in self.packs[pid]]
        except KeyError:
            raise ConfigError(f"pack {pid!r} is not in this config's plan") from None

    def pack_of(self) -> dict[str, str]:
        return {r: p for p, ids in self.packs.items() for r in ids}

    def pack_document(self, pid: str) -> dict:
        return {"pack_id": pid, "runs": [s.to_dict() for s in self.pack_specs(pid)]}

    def steps(self, pid: str) -> int:
        """Optimiser steps the pack runs (`rankbias.spec.pack_steps`)."""
        return pack_steps(self.pack_specs(pid))


# -- config ------------------------------------------------------------------------

def load_config(path: str | Path) -> dict:
    import yaml
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    return raw if raw is not None else {}


def resolve_config(raw: Mapping[str, Any]) -> dict:
    """Check the top-level structure and fill in defaults; errors name the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(TOP_KEYS)}")
    cfg = json.loads(json.dumps(TOP_DEFAULTS))
    for k, v in raw.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    if cfg["device"] not in DEVICES:
        raise ConfigError(f"device: {cfg['device']!r} is not one of {', '.join(DEVICES)}")
    if isinstance(cfg["graph"], bool):   # YAML 1.1 (and --config graph=off) read on/off as booleans
        cfg["graph"] = "on" if cfg["graph"] else "off"
    if cfg["graph"] not in GRAPH_MODES:
        raise ConfigError(f"graph: {cfg['graph']!r} is not one of {', '.join(GRAPH_MODES)}")
    for key in ("max_pack", "train_threads"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {v!r}")
    rank = cfg["rank"]
    if not isinstance(rank, Mapping) or set(rank) - {"normalise", "tol"}:
        raise ConfigError("rank: expected a mapping with keys normalise and tol")
    if rank["normalise"] not in M.NORMALISATIONS:
        raise ConfigError(f"rank.normalise: {rank['normalise']!r} is not one of "
                          f"{', '.join(M.NORMALISATIONS)}")
    tol = rank["tol"]
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ConfigError(f"rank.tol: expected a number > 0, got {tol!r}")
    for key in ("defaults", "figures", "extra", "claims"):
        if not isinstance(cfg[key], Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {cfg[key]!r}")
    bad = sorted(set(cfg["figures"]) - set(FIGURES))
    if bad:
        raise ConfigError(f"figures: unknown figure(s) {', '.join(map(repr, bad))}; "
                          f"allowed: {', '.join(FIGURES)}")
    clash = sorted(set(cfg["extra"]) & set(FIGURES))
    if clash:
        raise ConfigError(f"extra: group name(s) {', '.join(clash)} clash with figure names")
    _check_section("defaults", cfg["defaults"], allow_grid=False)
    return cfg


def _check_section(where: str, section: Any, allow_grid: bool = True) -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping of spec keys, got {section!r}")
    allowed = set(SECTION_KEYS) | ({"grid"} if allow_grid else set())
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys: {', '.join(sorted(allowed))}")
    if "seeds" in section:
        seeds = section["seeds"]
        if not isinstance(seeds, list) or not seeds or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ConfigError(f"{where}.seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
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


def section_specs(where: str, defaults: Mapping, section: Mapping) -> list[RunSpec]:
    """A figure's (or extra group's) runs: defaults, then the section, then each grid point."""
    _check_section(where, section)
    base = {**defaults, **{k: v for k, v in section.items() if k != "grid"}}
    if "model" in section:  # a figure's model name overrides defaults' arch/depth/width
        for k in ("arch", "depth", "width"):
            if k not in section:
                base.pop(k, None)
    seeds = base.pop("seeds", [0])
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
        ids = []
        for s in section_specs(where, cfg["defaults"], section or {}):
            specs.setdefault(s.run_id, s)
            if s.run_id not in ids:
                ids.append(s.run_id)
        groups[name] = ids
    packs = {}
    for members in make_packs(specs.values(), cfg["max_pack"]):
        packs[pack_id(members)] = [s.run_id for s in members]
    return Plan(config=cfg, specs=specs, groups=groups, packs=packs)


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


def config_bytes(p: Plan) -> bytes:
    return (json.dumps(p.config, indent=2, sort_keys=True) + "\n").encode()


def summary(p: Plan) -> dict:
    pack_of = p.pack_of()
    out = {"figures": {}, "packs": {}, "runs": len(p.specs)}
    for g, ids in p.groups.items():
        out["figures"][g] = {"runs": ids, "packs": sorted({pack_of[r] for r in ids})}
    for pid, ids in p.packs.items():
        first = p.specs[ids[0]]
        out["packs"][pid] = {"runs": ids, "model": first.model, "dataset": first.dataset,
                             "batch_size": sorted({p.specs[r].batch_size for r in ids}),
                             "epochs": first.epochs, "steps": p.steps(pid)}
    out["total_steps"] = sum(v["steps"] for v in out["packs"].values())
    return out


# -- CLI ---------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="show figures -> runs -> packs for a config (and write pack files)",
        description="Expand a config into runs and packs. Prints each figure's runs and each "
                    "pack's size and steps; optionally writes pack files.")
    p.add_argument("--config", default="config/config.yaml", help="config file (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write-packs", metavar="DIR", help="write every pack file DIR/<pack_id>.json "
                   "(only those missing or different)")
    p.add_argument("--write-pack", metavar="PACK_ID", help="write one pack file to --out")
    p.add_argument("--out", metavar="FILE", help="where --write-pack writes")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    p = plan_from_file(args.config)
    if args.write_pack:
        if not args.out:
            raise ConfigError("--write-pack needs --out FILE")
        write_if_changed(args.out, pack_bytes(p, args.write_pack))
    if args.write_packs:
        written = write_packs(p, args.write_packs)
        print(f"wrote {len(written)} of {len(p.packs)} pack file(s) to {args.write_packs}", file=sys.stderr)
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
