"""Config -> runs -> packs: grids, deduplication, pack files, errors that name the key."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from rankbias.plan import sweep
from rankbias.core.pack import load_pack

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config/config.yaml", "config/paper.yaml", ".test/config.yaml"]


def small(**figures):
    return {"defaults": {"dataset": "synthetic", "epochs": 2, "width": 8, "depth": 2, "arch": "mlp"},
            "figures": figures}


def test_grid_is_the_product_of_its_values_and_seeds():
    p = sweep.plan(small(fig2={"model": "MLP-BN-3-10", "seeds": [0, 1],
                               "grid": {"lr": [0.01, 0.1], "batch_size": [8, 16, 32]}}))
    specs = [p.specs[r] for r in p.groups["fig2"]]
    assert len(specs) == 12
    got = {(s.lr, s.batch_size, s.seed) for s in specs}
    assert got == set(itertools.product([0.01, 0.1], [8, 16, 32], [0, 1]))
    assert {(s.arch, s.depth, s.width, s.dataset, s.epochs) for s in specs} == {("mlp_bn", 3, 10, "synthetic", 2)}


def test_runs_shared_by_figures_are_deduplicated_and_packed_once():
    cfg = small(fig2={"grid": {"batch_size": [8, 16]}}, fig6={"grid": {"batch_size": [16, 32]}})
    p = sweep.plan(cfg)
    shared = set(p.groups["fig2"]) & set(p.groups["fig6"])
    assert len(shared) == 1 and len(p.specs) == 3
    packed = [r for ids in p.packs.values() for r in ids]
    assert sorted(packed) == sorted(p.specs)          # every run in exactly one pack


def test_pack_ids_are_stable_and_a_changed_run_changes_only_its_pack():
    cfg = small(fig2={"grid": {"batch_size": [8, 16], "lr": [0.01, 0.1]}})
    before = sweep.plan(cfg)
    again = sweep.plan(json.loads(json.dumps(cfg)))
    assert before.packs == again.packs
    cfg["figures"]["fig2"]["grid"]["lr"] = [0.01, 0.2]
    after = sweep.plan(cfg)
    changed = set(after.packs) - set(before.packs)
    kept = set(after.packs) & set(before.packs)
    assert len(changed) == 2 and len(kept) == 0  # both batch-size packs hold an lr=0.1 run
    cfg = small(fig2={"grid": {"batch_size": [8, 16]}}, fig3={"lr": 0.05, "grid": {"batch_size": [8, 16]}})
    before = sweep.plan(cfg)
    cfg["figures"]["fig3"]["grid"]["batch_size"] = [8, 32]
    after = sweep.plan(cfg)
    assert len(set(before.packs) - set(after.packs)) == 1


def test_pack_files_round_trip_and_are_written_only_when_changed(tmp_path):
    p = sweep.plan(small(fig1={"grid": {"weight_decay": [0, 5e-4]}}))
    assert len(sweep.write_packs(p, tmp_path)) == len(p.packs)
    for pid, ids in p.packs.items():
        doc = json.loads((tmp_path / f"{pid}.json").read_text())
        assert doc["pack_id"] == pid
        assert [s.run_id for s in load_pack(tmp_path / f"{pid}.json")] == ids
    mtimes = {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    assert sweep.write_packs(p, tmp_path) == []
    assert mtimes == {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()}


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_plan_and_satisfy_the_schema(path):
    from snakemake.utils import validate
    raw = yaml.safe_load((ROOT / path).read_text())
    validate(dict(raw), str(ROOT / "workflow/schemas/config.schema.yaml"))
    p = sweep.plan(raw)
    assert set(p.figures) == set(sweep.FIGURES)
    for ids in p.groups.values():
        assert ids


def test_quick_profile_shares_runs_and_has_what_the_claims_need():
    p = sweep.plan_from_file(ROOT / "config/config.yaml")
    assert set(p.groups["fig6"]) <= set(p.groups["fig2"])   # fig6 redraws fig2's runs
    specs = [p.specs[r] for r in p.groups["fig2"]]
    assert len({s.batch_size for s in specs}) >= 3              # C1
    lams = {p.specs[r].weight_decay for r in p.groups["fig3"]}
    assert 0.0 in lams and len(lams) >= 3                       # C3
    assert {s.dataset for s in p.specs.values()} == {"mnist"}


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["figures"].update(fig9={}), "fig9"),
    (lambda c: c["figures"]["fig2"].update(model="CNN-3-10"), "model"),
    (lambda c: c["figures"]["fig2"].update(dataset="imagenet"), "dataset"),
    (lambda c: c["figures"]["fig2"]["grid"].update(batch_size=[-8]), "batch_size"),
    (lambda c: c["figures"]["fig2"]["grid"].update(lr=["fast"]), "lr"),
    (lambda c: c["figures"]["fig2"].update(epochs="ten"), "epochs"),
    (lambda c: c["figures"]["fig2"].update(learning_rate=0.1), "learning_rate"),
    (lambda c: c["defaults"].update(weight_decay=-1.0), "weight_decay"),
    (lambda c: c.update(device="tpu"), "device"),
    (lambda c: c.update(graph="sometimes"), "graph"),
    (lambda c: c.update(graph=3), "graph"),
    (lambda c: c["rank"].update(tol=0), "rank.tol"),
    (lambda c: c["rank"].update(tol=float("inf")), "rank.tol"),   # passes the schema
    (lambda c: c["rank"].update(measure="entropy"), "rank.measure"),
])
def test_bad_configs_name_the_key(mutate, key):
    cfg = {"rank": {"normalise": "fro", "tol": 1e-3}, "defaults": {"dataset": "synthetic"},
           "figures": {"fig2": {"model": "MLP-BN-2-8", "grid": {"batch_size": [8], "lr": [0.1]}}}}
    mutate(cfg)
    with pytest.raises(sweep.SpecError, match=key.split(".")[-1]):
        sweep.plan(cfg)


def test_yaml_booleans_for_graph_read_as_on_and_off():
    cfg = {"defaults": {"dataset": "synthetic"},
           "figures": {"fig2": {"model": "MLP-BN-2-8", "grid": {"batch_size": [8], "lr": [0.1]}}}}
    assert yaml.safe_load("graph: off")["graph"] is False      # what YAML 1.1 does
    assert sweep.plan({**cfg, "graph": False}).config["graph"] == "off"
    assert sweep.plan({**cfg, "graph": True}).config["graph"] == "on"
    assert sweep.plan(cfg).config["graph"] == "auto"


def test_plan_cli(tmp_path, capsys):
    from rankbias.cli import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small(fig1={"grid": {"weight_decay": [0, 5e-4]}})))
    assert main(["plan", "--config", str(cfg), "--json", "--write-packs", str(tmp_path / "packs")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runs"] == 2 and len(doc["figures"]["fig1"]["runs"]) == 2
    # synthetic has 1024 training examples: 2 epochs of B=32 (the RunSpec default)
    assert all(v["steps"] == 2 * 32 for v in doc["packs"].values())
    assert sorted(f.stem for f in (tmp_path / "packs").iterdir()) == sorted(doc["packs"])
    pid = next(iter(doc["packs"]))
    assert main(["plan", "--config", str(cfg), "--write-pack", pid, "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["pack_id"] == pid
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 1


def test_batch_larger_than_the_subset_fails_at_plan_time():
    from rankbias.plan import sweep
    cfg = {"defaults": {"dataset": "synthetic", "train_subset": 16, "batch_size": 32},
           "figures": {"fig1": {"model": "MLP-BN-2-8"}}}
    with pytest.raises(sweep.ConfigError, match="batch_size"):
        sweep.plan(cfg)


def test_the_planner_imports_no_torch():
    """What the Snakefile and the rules import, in a fresh process, pulls in no torch:
    torch comes in only when a model's layer table is first needed."""
    import subprocess
    import sys
    code = ("import sys; import rankbias.plan.sweep, rankbias.plan.cluster, rankbias.train.data, rankbias.core.spec; "
            "heavy = sorted({'torch', 'torchvision', 'pandas', 'matplotlib'} & set(sys.modules)); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_duplicate_yaml_key_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("defaults:\n  dataset: synthetic\n  lr: 0.1\n  lr: 0.2\nfigures: {}\n")
    with pytest.raises(sweep.ConfigError, match=r"duplicate key 'lr'.*line 3.*line 4"):
        sweep.plan_from_file(cfg)
    cfg.write_text("figures:\n  fig1: {model: MLP-2-8}\nfigures:\n  fig2: {model: MLP-2-8}\n")
    with pytest.raises(sweep.ConfigError, match="duplicate key 'figures'"):
        sweep.load_config(cfg)


@pytest.mark.parametrize("section, key", [
    ({"model": "MLP-2-8", "seeds": [0, 0]}, "seeds"),
    ({"model": "MLP-2-8", "grid": {"lr": [0.1, 0.1]}}, "grid.lr"),
    ({"model": "MLP-2-8", "grid": {"seed": [1, 2, 1]}}, "grid.seed"),
])
def test_a_value_listed_twice_is_an_error_naming_the_key(section, key):
    with pytest.raises(sweep.ConfigError, match=f"figures.fig1.{key}: .* listed twice"):
        sweep.plan(small(fig1=section))


def test_a_pack_larger_than_the_device_is_refused_naming_it():
    from rankbias.plan.cluster import estimate_mem_mb
    p = sweep.plan(small(fig1={"model": "MLP-100000-100000"}))
    (pid,) = p.packs
    with pytest.raises(sweep.ConfigError, match=f"pack {pid} .*MLP-100000-100000.*device_memory_mb = 40960"):
        sweep.check_device_memory(p)
    # the key sets the device's memory: a pack needing 2 GiB fits 4 GiB, not 1 GiB
    cfg = small(fig1={"model": "MLP-2-8"})
    need = estimate_mem_mb(sweep.plan(cfg).pack_specs(next(iter(sweep.plan(cfg).packs))))
    sweep.check_device_memory(sweep.plan({**cfg, "device_memory_mb": need}))
    with pytest.raises(sweep.ConfigError, match="device_memory_mb"):
        sweep.check_device_memory(sweep.plan({**cfg, "device_memory_mb": need - 1}))


def test_plan_cli_refuses_a_pack_larger_than_the_device(tmp_path, capsys):
    from rankbias.cli import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small(fig1={"model": "MLP-100000-100000"})))
    assert main(["plan", "--config", str(cfg)]) == 1
    assert "device_memory_mb" in capsys.readouterr().err


def test_job_configs_change_only_where_the_config_does():
    base = sweep.plan_from_file(ROOT / ".test/config.yaml").config
    digests = lambda cfg: {k: sweep.config_digest(v) for k, v in sweep.job_configs(sweep.plan(cfg)).items()}
    before = digests(base)
    # the job config, one per paper figure; the summary figures read the job config
    assert len(set(before.values())) == len(before) - len(sweep.SUMMARY) == 1 + len(base["figures"])
    assert all(before[f] == before[None] for f in sweep.SUMMARY)
    lr = json.loads(json.dumps(base))
    lr["figures"]["fig7"]["lr"] = 0.02
    changed = {k for k, d in digests(lr).items() if d != before[k]}
    assert changed == {None, "fig7", *sweep.SUMMARY}
    tol = {**base, "rank": {**base["rank"], "tol": 0.05}}
    assert {k for k, d in digests(tol).items() if d != before[k]} == set(before)
    # another rank convention re-draws and re-judges from the stored spectra: same runs, same packs
    measure = {**base, "rank": {**base["rank"], "measure": "effective"}}
    assert {k for k, d in digests(measure).items() if d != before[k]} == set(before)
    assert sweep.plan(measure).packs == sweep.plan(base).packs
    for key, value in (("graph", "off"), ("device", "cuda"), ("checkpoint_every", 1), ("train_threads", 2)):
        assert digests({**base, key: value}) == before, key


def test_plan_cli_writes_the_config_files_named_by_their_content(tmp_path):
    from rankbias.cli import main
    p = sweep.plan_from_file(ROOT / ".test/config.yaml")
    text = json.dumps(sweep.job_config(p.config))
    assert main(["plan", "--config-json", text, "--write-configs", str(tmp_path / "c"),
                 "--write-packs", str(tmp_path / "packs")]) == 0
    written = {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()}
    want = {f"{sweep.config_digest(d)}.json": sweep.config_bytes(d) for d in sweep.job_configs(p).values()}
    assert written == want
    assert all(name == sweep.hashlib.sha256(b).hexdigest()[:12] + ".json" for name, b in written.items())
    assert sorted(f.stem for f in (tmp_path / "packs").iterdir()) == sorted(p.packs)
    # what a figure job reads plans that figure's runs exactly
    for fig, doc in sweep.job_configs(p).items():
        if fig:
            f = tmp_path / "c" / f"{sweep.config_digest(doc)}.json"
            assert sweep.figure_runs(sweep.plan_from_file(f), fig) == sweep.figure_runs(p, fig)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "defaults: *i\n"


@pytest.mark.parametrize("text, expected", [
    (BOMB, r"line 1: YAML anchors and aliases are refused"),
    ("defaults: &d {dataset: synthetic}\nextra:\n  g: *d\n", r"line 1: YAML anchors and aliases"),
    ("", r"empty; expected a YAML mapping of top-level keys"),
    ("# only a comment\n", r"empty; expected a YAML mapping"),
    ("- fig1\n- fig2\n", r"expected a YAML mapping of top-level keys, got a list"),
    ("figures:\n\tfig1: {}\n", r"line 2: a tab in the indentation; YAML indents with spaces"),
    ("device: cpu\n\x00\x01", r"not a text file"),
    ("device: c\xe9u\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 9\)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"not UTF-8 text|not a text file"),
])
def test_file_level_config_errors_name_the_file_and_what_was_expected(tmp_path, text, expected):
    cfg = tmp_path / "bad.yaml"
    (cfg.write_bytes if isinstance(text, bytes) else cfg.write_text)(text)
    with pytest.raises(sweep.ConfigError, match=rf"config file {cfg}(:|, | is)[^\n]*{expected}"):
        sweep.load_config(cfg)


def test_plan_cli_refuses_an_alias_bomb_at_once(tmp_path, capsys):
    from rankbias.cli import main
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    assert main(["plan", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"config file {cfg}, line 1: YAML anchors and aliases are refused" in err and len(err) < 500


def test_a_json_config_indented_with_tabs_loads(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(small(fig1={"model": "MLP-2-8"}), indent="\t"))
    assert sweep.load_config(cfg) == small(fig1={"model": "MLP-2-8"})


def test_unknown_top_level_keys_are_refused_by_one_check(tmp_path):
    with pytest.raises(sweep.ConfigError, match=r"config: unknown key\(s\) 'figurse'; allowed keys: device"):
        sweep.check_top_level({"figurse": {}})


def test_every_figure_has_one_group_the_report_shows_it_under():
    groups = {name: sweep.figure_group(name) for name in sweep.NAMES}
    assert groups == {**{f"fig{i}": "Paper figures" for i in range(1, 9)},
                      "figT1": "Theory", "figT2": "Theory", "figR": "Summaries", "figS": "Summaries"}
    assert set(groups.values()) == set(sweep.GROUPS.values())
    with pytest.raises(ValueError, match="fig9"):
        sweep.figure_group("fig9")
