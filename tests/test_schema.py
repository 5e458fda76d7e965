"""The config model (rankbias.core.config) is the one definition of every config key: the
JSON schema Snakemake validates against and config/README.md's key tables are generated
from it (`rankbias schema --write`), and the schema, as jsonschema reads it, allows what
the planner's checks allow."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from rankbias.cli import main
from rankbias.core import config, families
from rankbias.core.spec import RunSpec, SpecError
from rankbias.plan import schema, sweep

ROOT = Path(__file__).resolve().parents[1]


def test_the_checked_in_schema_is_the_generated_one():
    """Byte for byte: run `rankbias schema --write` after changing the config model."""
    assert (ROOT / schema.SCHEMA_FILE).read_bytes() == schema.schema_text().encode()
    assert schema.schema_text().startswith("# Generated from the config model")


def test_the_readme_key_tables_are_the_generated_ones():
    text = (ROOT / schema.README_FILE).read_text(encoding="utf-8")
    assert schema.readme_text(text) == text
    for name, body in schema.tables().items():
        assert body in text, name
    for k in [*config.TOP, *config.SPEC.keys() - {"seed"}, *config.SECTION]:
        assert f"| `{k}` |" in text, k


def test_schema_check_and_write(tmp_path, capsys):
    for f in (schema.SCHEMA_FILE, schema.README_FILE):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    assert main(["schema", "--check", "--root", str(tmp_path)]) == 0
    readme = tmp_path / schema.README_FILE
    readme.write_text(readme.read_text().replace("| `lr` | `0.1` |", "| `lr` | `0.2` |"))
    (tmp_path / schema.SCHEMA_FILE).write_text("# edited by hand\n")
    assert main(["schema", "--check", "--root", str(tmp_path)]) == 1
    assert "differs from the config model" in capsys.readouterr().err
    assert main(["schema", "--write", "--root", str(tmp_path)]) == 0
    for f in (schema.SCHEMA_FILE, schema.README_FILE):
        assert (tmp_path / f).read_bytes() == (ROOT / f).read_bytes(), f
    readme.write_text(readme.read_text().replace("<!-- end of spec keys -->\n", ""))
    assert main(["schema", "--check", "--root", str(tmp_path)]) == 1
    assert "expected one '<!-- spec keys:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def validator():
    """The schema as Snakemake's validate reads it (jsonschema, draft 2020-12)."""
    from jsonschema import Draft202012Validator
    return Draft202012Validator(yaml.safe_load((ROOT / schema.SCHEMA_FILE).read_text()))


VALUES = [None, True, False, 0, 1, 2, 3, -1, 0.5, 1.0, 1.5, 0.999, 64, 1e9, "x", "", "auto", "on",
          [], [0], [1, 2], [2, 1], [1.0], [0.5], [True], ["a"], {}]


def _candidates(k: config.Key) -> list:
    bounds = [b for b in (k.low, k.high) if b is not None]
    return VALUES + list(k.choices) + bounds + [b + d for b in bounds for d in (-1, 1)] + [_json(k.default)]


def _json(v):
    return list(v) if isinstance(v, tuple) else v


def _planner_allows(k: config.Key, value, where: str) -> bool:
    if k.booleans and isinstance(value, bool):     # the planner reads YAML's on/off so
        value = k.booleans[value]
    try:
        config.check(k, value, where)
        return True
    except SpecError as e:
        assert str(e).startswith(f"{where}: ") or str(e).startswith(f"{where}."), e
        return False


@pytest.mark.parametrize("place", ["top", "rank", "claims", "spec"])
def test_the_schema_allows_what_the_planner_allows(validator, place):
    """Every key, at values of every type and at its bounds: jsonschema on the generated
    schema and config.check (the planner's check, whose message names the key) agree."""
    table = {"top": {n: k for n, k in config.TOP.items() if k.kind is not dict}, "rank": config.RANK,
             "claims": config.CLAIMS, "spec": {n: k for n, k in config.SPEC.items() if n != "seed"}}[place]
    checked = 0
    for name, k in table.items():
        for value in _candidates(k):
            doc, where = {
                "top": ({name: value}, name), "rank": ({"rank": {name: value}}, f"rank.{name}"),
                "claims": ({"claims": {name: value}}, f"claims.{name}"),
                "spec": ({"defaults": {name: value}}, name)}[place]
            assert validator.is_valid(doc) == _planner_allows(k, value, where), (where, value)
            checked += 1
    assert checked > 20 * len(table)


def test_seeds_and_grids_agree(validator):
    k = config.SECTION["seeds"]
    for value in _candidates(k):
        assert validator.is_valid({"extra": {"g": {"seeds": value}}}) == _planner_allows(k, value, "seeds"), value
    for name, k in config.SPEC.items():                    # a grid lists values of any spec key, seed too
        assert validator.is_valid({"figures": {"fig2": {"grid": {name: [_json(k.default)]}}}}), name
        assert not validator.is_valid({"figures": {"fig2": {"grid": {name: []}}}}), name
    assert not validator.is_valid({"figures": {"fig2": {"seed": 1}}})        # a section lists seeds
    assert not validator.is_valid({"extra": {"fig2": {}}})                    # a figure's name


NAMES = ["MLP-2-8", "mlp-2-8", "MLP-BN-10-100", "mlp-bn-10-100", "Mlp-Wn-3-4", "res-bn-2-8", "RES-2-8",
         "CONV-BN-0-4", "conv-bn-0-4", "conv-5-64", "VGG-16", "vgg-16", "ResNet-18", "resnet-18", " MLP-2-8 ",
         "CNN-3-10", "CONVX-2-8", "VGG-19", "VGG-16-4-4", "RESNET-34", "MLP-2", "MLP-2-8-1", "mlp_bn-2-8",
         "MLP--2-8", "MLP-BN-2-x", "BN-2-8", "", "MLP 2 8"]


def test_model_names_parse_in_any_case_in_the_schema_and_the_planner(validator):
    """Any case parses (parse_model_name upper-cases); the schema's pattern, generated
    from the family registry, accepts exactly the names the planner parses."""
    accepted = set()
    for name in NAMES:
        try:
            families.parse_model_name(name)
            parses = True
        except families.ModelError:
            parses = False
        assert validator.is_valid({"defaults": {"model": name}}) == parses, name
        if parses:
            accepted.add(name)
    assert {"conv-bn-0-4", "vgg-16", "ResNet-18", "Mlp-Wn-3-4"} <= accepted
    assert {"CNN-3-10", "VGG-19", "mlp_bn-2-8", "MLP-2"}.isdisjoint(accepted)
    for f in families.FAMILIES.values():          # every family, in both cases
        name = f.name if f.fixed else f"{f.name}-2-8"
        for form in (name, name.lower()):
            assert validator.is_valid({"defaults": {"model": form}}), form
            assert families.parse_model_name(form)[0] == f.arch


def test_a_model_named_in_lower_case_plans_the_same_runs():
    """The case of a model name changes no run_id: a spec holds arch, depth and width."""
    def ids(model):
        cfg = {"defaults": {"dataset": "synthetic", "epochs": 2},
               "figures": {"fig2": {"model": model, "grid": {"batch_size": [8, 16]}}}}
        return list(sweep.plan(cfg).specs)
    assert ids("conv-bn-0-4") == ids("CONV-BN-0-4") == ids("Conv-Bn-0-4")
    assert RunSpec.from_dict({"model": "conv-bn-0-4"}).model == "CONV-BN-0-4"


def test_defaults_derive_from_the_model():
    """RunSpec's defaults, the planner's top-level defaults and the schema's are the model's."""
    assert RunSpec() == RunSpec(**{n: k.default for n, k in config.SPEC.items()})
    resolved = sweep.resolve_config({})
    assert resolved == {n: k.default for n, k in config.TOP.items()}
    assert resolved["rank"] == config.defaults(config.RankKeys)
    props = schema.json_schema()["properties"]
    assert {n: p["default"] for n, p in props.items()} == resolved
