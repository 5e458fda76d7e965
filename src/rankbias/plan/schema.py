"""The config's JSON schema and config/README.md's key tables, generated from the config
model (rankbias.core.config) and the figure registry (rankbias.plan.sweep.FIGURES).

Snakemake validates a config against the schema (workflow/schemas/config.schema.yaml);
the planner checks the same keys with rankbias.core.config.check. Neither file is edited
by hand: `rankbias schema --write` (in the repository's root) writes both, and
tests/test_schema.py checks that the checked-in files are what it writes.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from rankbias.core import config
from rankbias.core.config import Key
from rankbias.plan.sweep import FIGURES, write_if_changed

SCHEMA_FILE = "workflow/schemas/config.schema.yaml"
README_FILE = "config/README.md"
HEADER = ("# Generated from the config model (rankbias.core.config) by `rankbias schema --write`;\n"
          "# do not edit: change the model and run it again (tests/test_schema.py compares).\n")


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _bounds(k: Key) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if k.low is not None:
        out["exclusiveMinimum" if k.open_low else "minimum"] = _number(k.low)
    if k.high is not None:
        out["exclusiveMaximum" if k.open_high else "maximum"] = _number(k.high)
    return out


def prop(k: Key, describe: bool = True, default: bool = False) -> dict[str, Any]:
    """The JSON schema of one key's value."""
    p: dict[str, Any]
    if k.kind is bool:
        p = {"type": "boolean"}
    elif k.kind is int:
        p = {"type": "integer", **_bounds(k)}
    elif k.kind is float:
        p = {"type": "number", **_bounds(k)}
    elif k.kind is tuple:
        p = {"type": "array", **({"minItems": k.min_items} if k.min_items else {}),
             "items": {"type": "integer", **_bounds(k)}}
    elif k.kind is str:
        p = {"type": "string", **({"enum": list(k.choices)} if k.choices else {}),
             **({"pattern": k.pattern} if k.pattern else {})}
        if k.booleans:
            p = {"anyOf": [p, {"type": "boolean"}]}
    elif k.keys is not None:
        p = {"$ref": f"#/definitions/{k.name}"}
    else:
        p = {"type": "object"}
    if default:
        p["default"] = list(k.default) if isinstance(k.default, tuple) else k.default
    if describe:
        p["description"] = k.meaning
    return p


def _mapping(cls: type, defaults: bool) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "properties": {n: prop(k, default=defaults) for n, k in config.keys(cls).items()}}


def _section_keys() -> dict[str, Key]:
    """A section's keys: `model`, the spec keys but `seed`, `seeds`."""
    spec = {n: k for n, k in config.SPEC.items() if n != "seed"}
    return {"model": config.SECTION["model"], **spec, "seeds": config.SECTION["seeds"]}


def json_schema(figures: tuple[str, ...] = FIGURES) -> dict[str, Any]:
    """The config's JSON schema (draft 2020-12, as Snakemake's validate reads it). Spec keys
    state no default: Snakemake would write it into every section."""
    section = _section_keys()
    run = {"model": config.SECTION["model"], **config.SPEC}
    top = config.TOP
    props: dict[str, Any] = {}
    for name, k in top.items():
        if name in ("defaults", "figures", "extra"):
            continue
        props[name] = prop(k, default=True)
    props["defaults"] = {"$ref": "#/definitions/defaults", "default": {}, "description": top["defaults"].meaning}
    props["figures"] = {"type": "object", "additionalProperties": False, "default": {},
                        "description": top["figures"].meaning,
                        "properties": {f: {"$ref": "#/definitions/figure"} for f in figures}}
    props["extra"] = {"type": "object", "default": {}, "description": top["extra"].meaning,
                      "propertyNames": {"not": {"pattern": f"^({'|'.join(figures)})$"}},
                      "additionalProperties": {"$ref": "#/definitions/section"}}
    props = {n: props[n] for n in top}
    nested = {n: k.keys for n, k in top.items() if k.keys is not None}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rankbias workflow config",
        "description": "Figures and extra run groups, each a base run spec merged over `defaults` plus a grid "
                       "of varied keys. rankbias.plan.sweep checks the same keys (and each run's spec) with "
                       "rankbias.core.config, the model this schema is generated from.",
        "type": "object",
        "additionalProperties": False,
        "definitions": {
            "spec_keys": {"type": "object", "properties": {n: prop(k) for n, k in section.items()}},
            "grid": {"type": "object", "description": "spec keys mapped to the list of values the section varies",
                     "additionalProperties": False,
                     "properties": {n: {"type": "array", "minItems": 1, "items": prop(k, describe=False)}
                                    for n, k in run.items()}},
            "defaults": {"allOf": [{"$ref": "#/definitions/spec_keys"}], "unevaluatedProperties": False},
            "section": {"allOf": [{"$ref": "#/definitions/spec_keys"}], "properties": {"grid": {"$ref": "#/definitions/grid"}},
                        "unevaluatedProperties": False},
            "figure": {"allOf": [{"$ref": "#/definitions/spec_keys"}],
                       "properties": {"grid": {"$ref": "#/definitions/grid"},
                                      "rank": {"$ref": "#/definitions/rank",
                                               "description": "this figure's own rank settings, over the "
                                                              "top-level rank"}},
                       "unevaluatedProperties": False},
            # A mapping whose default holds its keys' defaults states them (Snakemake fills
            # them in); `claims` holds overrides only.
            **{n: _mapping(cls, defaults=bool(top[n].default)) for n, cls in nested.items()},
        },
        "properties": props,
    }


def schema_text(figures: tuple[str, ...] = FIGURES) -> str:
    """The checked-in schema file: the header, then the schema as YAML."""
    import yaml
    return HEADER + yaml.safe_dump(json_schema(figures), sort_keys=False, allow_unicode=True, width=110,
                                   default_flow_style=None)


# -- config/README.md --------------------------------------------------------------

def _show(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return f"[{', '.join(_show(x) for x in v)}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


def table(ks: dict[str, Key], prefix: str = "", notes: dict[str, str] | None = None) -> str:
    """A markdown table of keys: name, default, meaning (and `notes`' words on a key)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, k in ks.items():
        note = (notes or {}).get(name, "")
        default = _show(k.default)
        shown = default if k.default is None else f"`{default}`"
        allowed = f"; {'each ' if k.kind is tuple else ''}{k.bounds}" if k.bounds else ""
        rows.append(f"| `{prefix}{name}` | {shown} | {k.meaning}{allowed}{note} |".replace("\n", " "))
    return "\n".join(rows) + "\n"


def tables() -> dict[str, str]:
    """config/README.md's generated tables, by the name its markers give them."""
    section = _section_keys()
    figures = {"figures": f"; the figures: {', '.join(f'`{f}`' for f in FIGURES)}"}
    return {"top-level keys": table(config.TOP, notes=figures), "rank keys": table(config.RANK, "rank."),
            "spec keys": table(section), "claims keys": table(config.CLAIMS, "claims.")}


def _marker(name: str) -> tuple[str, str]:
    return (f"<!-- {name}: generated by `rankbias schema --write`, do not edit -->\n",
            f"<!-- end of {name} -->\n")


def readme_text(text: str) -> str:
    """`text` (config/README.md) with each generated table written anew between its markers."""
    for name, body in tables().items():
        begin, end = _marker(name)
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"{README_FILE}: expected one '{begin.strip()}' ... '{end.strip()}' block "
                             f"for the table of {name}")
        text = pattern.sub((begin + body + end).replace("\\", "\\\\"), text)
    return text


def generated(root: Path) -> dict[Path, str]:
    """Each generated file under the repository root `root`, and what it must hold."""
    readme = root / README_FILE
    return {root / SCHEMA_FILE: schema_text(), readme: readme_text(readme.read_text(encoding="utf-8"))}


# -- CLI ---------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "schema", help="the config's JSON schema and config/README.md's key tables, from the config model",
        description=f"Generate {SCHEMA_FILE} and the key tables of {README_FILE} from the config model "
                    "(rankbias.core.config). Without options, print the schema.")
    p.add_argument("--write", action="store_true", help="write both files (under --root)")
    p.add_argument("--check", action="store_true", help="exit 1, naming them, if either file differs")
    p.add_argument("--root", default=".", help="the repository's root (default: the current directory)")
    p.set_defaults(func=_cmd_schema)


def _cmd_schema(args: argparse.Namespace) -> int:
    if not (args.write or args.check):
        sys.stdout.write(schema_text())
        return 0
    stale = []
    for path, text in generated(Path(args.root)).items():
        if path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if args.write:
                write_if_changed(path, text.encode())
    for path in stale:
        print(f"{'wrote' if args.write else 'differs from the config model'}: {path}", file=sys.stderr)
    return 1 if stale and args.check else 0
