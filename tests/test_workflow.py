"""The Snakemake workflow, run for real on the tiny config (.test/config.yaml) in a
copy of the repository: end to end, incremental, deduplicated, validated, reported."""
from __future__ import annotations

import json
import re
import zipfile

import pytest
import yaml
from conftest import TEST_CONFIG, copy_repo, planned_jobs, snakemake

from rankbias import figures, sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(tiny_pipeline):
    """The tiny pipeline, built once per session (conftest.tiny_pipeline; test_slurm
    compares its SLURM run with the same build)."""
    return tiny_pipeline


def _dry_run(wd, *args: str) -> dict[str, int]:
    p = snakemake(wd, *args, "-n")
    return planned_jobs(p.stdout + p.stderr)


def test_end_to_end_builds_every_figure_and_the_claims(done):
    wd, _ = done
    for name in figures.NAMES:
        for ext in ("png", "pdf"):
            f = wd / "results" / "figures" / f"{name}.{ext}"
            assert f.stat().st_size > 1000, f
    doc = json.loads((wd / "results" / "claims.json").read_text())
    assert [c["id"] for c in doc["claims"]] == [f"C{i}" for i in range(1, 8)]
    assert all(c["verdict"] in ("holds", "fails", "insufficient") for c in doc["claims"])
    assert "| C1 |" in (wd / "results" / "claims.md").read_text()
    p = sweep.plan_from_file(wd / TEST_CONFIG)
    for rid in p.specs:
        info = json.loads((wd / "results" / "runs" / rid / "run.json").read_text())
        assert info["run_id"] == rid and info["spec"] == p.specs[rid].to_dict()


def test_a_run_shared_by_two_figures_trains_once(done):
    wd, log = done
    p = sweep.plan_from_file(wd / TEST_CONFIG)
    shared = set(p.groups["fig2"]) & set(p.groups["fig6"])
    assert shared
    train_jobs = re.findall(r"rule (train_[0-9a-f]{12}):", log)
    assert sorted(train_jobs) == sorted(f"train_{pid}" for pid in p.packs)   # each pack once
    packed = [r for ids in p.packs.values() for r in ids]
    assert len(packed) == len(set(packed)) == len(p.specs)


def test_second_run_does_nothing(done):
    wd, _ = done
    before = {f: f.stat().st_mtime_ns for f in (wd / "results").rglob("*") if f.is_file()}
    p = snakemake(wd, "--configfile", TEST_CONFIG, "-n")
    assert planned_jobs(p.stdout + p.stderr) == {}, p.stdout
    p = snakemake(wd, "--configfile", TEST_CONFIG)
    assert "Nothing to be done" in p.stdout + p.stderr
    after = {f: f.stat().st_mtime_ns for f in (wd / "results").rglob("*") if f.is_file()}
    assert {f: t for f, t in after.items() if f in before} == {f: before[f] for f in after if f in before}


def test_changing_one_runs_lr_retrains_only_its_pack(done):
    wd, _ = done
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["figures"]["fig7"]["lr"] = 0.02
    changed = wd / ".test" / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    old, new = sweep.plan_from_file(wd / TEST_CONFIG), sweep.plan_from_file(changed)
    new_packs = set(new.packs) - set(old.packs)
    assert len(new_packs) == 1
    jobs = _dry_run(wd, "--configfile", str(changed.relative_to(wd)))
    assert {k: v for k, v in jobs.items() if k.startswith("train_")} == {f"train_{new_packs.pop()}": 1}
    # fig7, the summary figures (drawn from every run) and the claims only
    assert jobs.get("figure") == 1 + len(figures.SUMMARY) and jobs.get("claims") == 1


def test_rethresholding_redraws_without_retraining(done):
    wd, _ = done
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["rank"]["tol"] = 0.05
    (wd / ".test" / "tol.yaml").write_text(yaml.safe_dump(cfg))
    jobs = _dry_run(wd, "--configfile", ".test/tol.yaml")
    assert not any(k.startswith("train_") for k in jobs)
    assert jobs.get("figure") == len(figures.NAMES) and jobs.get("claims") == 1


def test_switching_the_cuda_graph_retrains_nothing(done):
    """`graph` reaches the jobs through the environment, not their command line, so
    Snakemake's code trigger does not see it."""
    wd, _ = done
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["graph"] = "off"
    (wd / ".test" / "graph.yaml").write_text(yaml.safe_dump(cfg))
    jobs = _dry_run(wd, "--configfile", ".test/graph.yaml")
    assert not any(k.startswith("train_") for k in jobs), jobs


def test_report_holds_every_figure(done):
    wd, _ = done
    snakemake(wd, "--configfile", TEST_CONFIG, "--report", "report.zip")
    names = zipfile.ZipFile(wd / "report.zip").namelist()
    for i in range(1, 8):
        assert any(n.endswith(f"fig{i}.png") for n in names), names
        assert any(n.endswith(f"fig{i}.provenance.json") for n in names), names


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["figures"].update(fig9={"model": "MLP-2-16"}), "fig9"),
    (lambda c: c["figures"]["fig2"].update(model="CNN-2-16"), "model"),
    (lambda c: c["defaults"].update(dataset="imagenet"), "dataset"),
    (lambda c: c["defaults"].update(epochs="three"), "epochs"),
    (lambda c: c["figures"]["fig5"]["grid"].update(batch_size=[-64]), "batch_size"),
    # passes the schema; the run spec check rejects BatchNorm with batches of one
    (lambda c: c["figures"]["fig1"].update(model="MLP-BN-2-16", batch_size=1), "batch_size"),
])
def test_bad_config_fails_before_any_job(tmp_path, edit, key):
    wd = copy_repo(tmp_path)
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    edit(cfg)
    (wd / "bad.yaml").write_text(yaml.safe_dump(cfg))
    p = snakemake(wd, "--configfile", "bad.yaml", check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert key in text, text[-3000:]
    assert not (wd / "results" / "runs").exists() and not (wd / "data").exists()
    assert "rule " not in p.stdout
