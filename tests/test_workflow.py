"""The Snakemake workflow, run for real on the tiny config (.test/config.yaml) in a
copy of the repository: end to end, incremental, deduplicated, validated, reported."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import zipfile

import pytest
import yaml
from conftest import BIN, TEST_CONFIG, copy_repo, needs_mnist, planned_jobs, snakemake

from rankbias.core import datasets
from rankbias.plan import sweep

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
    for name in sweep.NAMES:
        for ext in ("png", "pdf"):
            f = wd / "results" / "figures" / f"{name}.{ext}"
            assert f.stat().st_size > 1000, f
    doc = json.loads((wd / "results" / "claims.json").read_text())
    assert [c["id"] for c in doc["claims"]] == [f"C{i}" for i in range(1, 8)] + ["T1", "T2", "T3", "R1", "R2", "R3"]
    assert all(c["verdict"] in ("holds", "fails", "insufficient") for c in doc["claims"])
    theory = {c["id"]: c for c in doc["claims"] if c["id"].startswith("T")}
    assert {c["verdict"] for c in theory.values()} == {"holds"}, theory
    assert "## Robustness to the rank convention" in (wd / "results" / "claims.md").read_text()
    assert "| C1 |" in (wd / "results" / "claims.md").read_text()
    p = sweep.plan_from_file(wd / TEST_CONFIG)
    for rid in p.specs:
        info = json.loads((wd / "results" / "runs" / rid / "run.json").read_text())
        assert info["run_id"] == rid and info["spec"] == p.specs[rid].to_dict()


def test_each_job_carries_the_timing_log_and_the_run_plan_in_its_command(done):
    """The pipeline ran with the venv off PATH and no $RANKBIAS_TIMING (conftest.snakemake):
    every job's command found `rankbias`, appended its line to the timing log, and each
    training job read the run's plan file (--run-plan) for the whole run's line."""
    wd, _ = done
    assert "RANKBIAS_TIMING" not in os.environ
    p = sweep.plan_from_file(wd / TEST_CONFIG)
    rows = [json.loads(line) for line in (wd / "results" / "logs" / "timing.jsonl").read_text().splitlines()]
    trained = {pid for pid in p.packs for r in rows if r["command"] == "train" and f"{pid}.json" in r["target"]}
    drawn = {name for name in sweep.figure_names(p) for r in rows
             if r["command"] == "figure" and r["target"].split()[:2] == ["figure", name]}
    assert trained == set(p.packs) and drawn == set(sweep.figure_names(p)), rows
    assert {r["command"] for r in rows} >= {"plan", "data", "claims"} and all(r["rc"] == 0 for r in rows)
    assert set(json.loads((wd / "results" / "logs" / "run-plan.json").read_text())["packs"]) == set(p.packs)
    for pid in p.packs:
        log = (wd / "results" / "logs" / "train" / f"{pid}.log").read_text()
        assert re.search(r"^\[run\] \d+/\d+ pack\(s\) trained, ", log, re.M), log[-2000:]


def test_parsing_sets_nothing_in_the_environment_but_the_planned_config(tmp_path):
    """What a job needs travels in its own command (a SLURM node or a container sees the
    same): a parse, in Snakemake's own process, changes no environment variable but the
    documented hand-off RANKBIAS_PLANNED_CONFIG."""
    wd = copy_repo(tmp_path)
    code = ("import atexit, json, os, sys\n"
            "before = dict(os.environ)\n"
            "atexit.register(lambda: print('CHANGED', json.dumps(sorted(\n"
            "    k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)))))\n"
            "from snakemake.cli import main\n"
            f"sys.argv = ['snakemake', '-n', '--cores', '1', '--configfile', {TEST_CONFIG!r}]\n"
            "main()\n")
    p = subprocess.run([str(BIN / "python"), "-c", code], cwd=wd, capture_output=True, text=True, timeout=600,
                       check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "rule train_" in out, out[-3000:]
    assert 'CHANGED ["RANKBIAS_PLANNED_CONFIG"]' in out, out[-3000:]


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
    pack = new_packs.pop()
    jobs = _dry_run(wd, "--configfile", str(changed.relative_to(wd)))
    assert {k: v for k, v in jobs.items() if k.startswith("train_")} == {f"train_{pack}": 1}
    # fig7, any figure with a run in the retrained pack, the summary figures (drawn
    # from every run) and the claims only
    redrawn = {f for f in sweep.figure_names(new)
               if sweep.figure_runs(new, f) != sweep.figure_runs(old, f)
               or set(sweep.figure_runs(new, f)) & set(new.packs[pack])}
    assert "fig7" in redrawn and len(redrawn) < len(sweep.figure_names(new))
    assert jobs.get("figure") == len(redrawn) and jobs.get("claims") == 1


def test_rethresholding_redraws_without_retraining(done):
    wd, _ = done
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["rank"]["tol"] = 0.05
    (wd / ".test" / "tol.yaml").write_text(yaml.safe_dump(cfg))
    jobs = _dry_run(wd, "--configfile", ".test/tol.yaml")
    assert not any(k.startswith("train_") for k in jobs)
    assert jobs.get("figure") == len(sweep.NAMES) and jobs.get("claims") == 1


def test_switching_the_cuda_graph_retrains_nothing(done):
    """`graph` reaches the train jobs as a resource, which is no rerun trigger."""
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
    for name in sweep.FIGURES:
        assert any(n.endswith(f"{name}.png") for n in names), names
        assert any(n.endswith(f"{name}.provenance.html") for n in names), names


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["figures"].update(fig9={"model": "MLP-2-16"}), "fig9"),
    (lambda c: c["figures"]["fig2"].update(model="CNN-2-16"), "model"),
    (lambda c: c["defaults"].update(dataset="imagenet"), "dataset"),
    (lambda c: c["defaults"].update(epochs="three"), "epochs"),
    (lambda c: c["figures"]["fig5"]["grid"].update(batch_size=[-64]), "batch_size"),
    # passes the schema; the run spec check rejects BatchNorm with batches of one
    (lambda c: c["figures"]["fig1"].update(model="MLP-BN-2-16", batch_size=1), "batch_size"),
    (lambda c: c["defaults"].update(seeds=[0, 0]), "seeds"),
    (lambda c: c["figures"]["fig2"].update(schedule="multistep", milestones=[1, 3]), "milestones"),
    (lambda c: c["defaults"].update(weight_decay=1e9), "weight_decay"),
    (lambda c: c["figures"]["fig1"].update(model="MLP-100000-100000"), "device_memory_mb"),
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


# -- parsing writes nothing; jobs read what was planned -----------------------------------

def _tree(wd) -> dict:
    """Every file under results/ and data/ with its bytes' hash and mtime."""
    return {str(f.relative_to(wd)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for d in ("results", "data") for f in (wd / d).rglob("*") if f.is_file()}


def _other_config(wd):
    """The tiny config with every run changed (another defaults lr): no run in common."""
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["defaults"]["lr"] = 0.07
    for section in cfg["figures"].values():
        section.get("grid", {}).pop("lr", None)
    (wd / "other.yaml").write_text(yaml.safe_dump(cfg))
    return "other.yaml"


def test_dry_runs_and_lint_with_another_config_write_nothing(done):
    wd, _ = done
    before = _tree(wd)
    other = _other_config(wd)
    assert any(k.startswith("train_") for k in _dry_run(wd, "--configfile", other))
    snakemake(wd, "--configfile", other, "--lint", check=False)
    snakemake(wd, "--configfile", TEST_CONFIG, "-n", "--forceall")
    assert _tree(wd) == before
    assert _dry_run(wd, "--configfile", TEST_CONFIG) == {}


@pytest.mark.parametrize("configfile", [TEST_CONFIG, "config/config.yaml"])
def test_parsing_imports_no_torch(done, configfile):
    """What Snakemake imports and computes on every parse (here a dry run, in Snakemake's
    own process): the plan, each pack's cost and memory estimates, the shape checks,
    for the tiny pipeline that is done and for the quick profile (a conv model among
    them) that is not; torch stays out."""
    wd, _ = done
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-ABSENT'))\n"
            "from snakemake.cli import main\n"
            f"sys.argv = ['snakemake', '-n', '--cores', '1', '--configfile', {configfile!r}]\n"
            "main()\n")
    p = subprocess.run([str(BIN / "python"), "-c", code], cwd=wd, capture_output=True, text=True, timeout=600,
                       check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "TORCH-ABSENT" in out, out[-3000:]
    assert ("Nothing to be done" in out) == (configfile == TEST_CONFIG), out[-3000:]


# A dry run that stats an output twice while a running job replaces it stops with this
# (Snakemake deletes a job's outputs before running it): a race of the two Snakemakes'
# scans, not of the plan hand-off tested below.
RACE = "Unable to obtain modification time of file"


def test_running_jobs_read_the_config_they_were_planned_with(done, tmp_path):
    """Dry runs with another config while the figure and claims jobs run: every figure
    still draws all its planned runs, the claims miss none, and the pipeline is then
    complete for the config it ran."""
    wd = tmp_path / "wd"
    shutil.copytree(done[0], wd, symlinks=True)
    other = _other_config(wd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    log_file = tmp_path / "running.log"
    with log_file.open("w") as log_out:     # a file, not a pipe nobody reads while it runs
        running = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", "--configfile", TEST_CONFIG,
                                    "--forcerun", "figure", "claims"], cwd=wd, env=env,
                                   stdout=log_out, stderr=subprocess.STDOUT, text=True)
        deadline, dry_runs = time.monotonic() + 1200, 0
        while running.poll() is None:
            if time.monotonic() > deadline:
                running.kill()
                pytest.fail(f"the running pipeline did not finish in 20 min:\n{log_file.read_text()[-4000:]}")
            dry = snakemake(wd, "--configfile", other, "-n", check=False)
            if dry.returncode != 0 and RACE in dry.stdout + dry.stderr:
                continue    # Snakemake's own scan met an output the running job was replacing
            assert dry.returncode == 0, (dry.stdout + dry.stderr)[-4000:]
            dry_runs += 1
    assert running.returncode == 0, log_file.read_text()[-4000:]
    assert dry_runs >= 2
    p = sweep.plan_from_file(wd / TEST_CONFIG)
    for fig, ids in p.figures.items():
        prov = json.loads((wd / "results" / "figures" / f"{fig}.provenance.json").read_text())
        assert prov["config"]["missing_runs"] == [] and sorted(r["run_id"] for r in prov["runs"]) == sorted(ids), fig
    claims = json.loads((wd / "results" / "claims.json").read_text())
    assert claims["missing_runs"] == [] and claims["runs"]["available"] == len(p.specs)
    assert _dry_run(wd, "--configfile", TEST_CONFIG) == {}


def test_a_job_parsed_again_reads_the_config_it_was_planned_with(done, tmp_path):
    """Each SLURM job runs Snakemake again on its node, in remote mode (the command the
    executor plugins build); the config file has changed since the submission, but the
    job draws the planned runs (the submitting Snakemake exported its plan)."""
    wd = tmp_path / "wd"
    shutil.copytree(done[0], wd, symlinks=True)
    (wd / TEST_CONFIG).write_text((wd / _other_config(wd)).read_text())
    planned = sweep.plan_from_file(done[0] / TEST_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["RANKBIAS_PLANNED_CONFIG"] = json.dumps(planned.config, sort_keys=True)
    job = [str(BIN / "python"), "-m", "snakemake", "--snakefile", "Snakefile", "--target-jobs",
           "figure:fig=fig2", "--allowed-rules", "figure", "--cores", "1", "--force-use-threads",
           "--configfiles", TEST_CONFIG, "--mode", "remote"]
    p = subprocess.run(job, cwd=wd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    prov = json.loads((wd / "results" / "figures" / "fig2.provenance.json").read_text())
    assert sorted(r["run_id"] for r in prov["runs"]) == sorted(planned.groups["fig2"])


def test_the_catalogs_test_convention_plans_every_job(tmp_path):
    """`snakemake -n --directory .test` (the Snakemake workflow catalog's test run) finds
    .test/config/config.yaml, the tiny config, and plans every job of its pipeline: the
    plan, the dataset, each pack's training, every figure, the claims and `all`."""
    wd = copy_repo(tmp_path)
    assert (wd / ".test/config/config.yaml").resolve() == (wd / TEST_CONFIG).resolve()
    p = snakemake(wd, "-n", "--directory", ".test")
    plan = sweep.plan_from_file(wd / TEST_CONFIG)
    assert plan.packs and sweep.figure_names(plan)
    expected = {"plan": 1, "data_synthetic": 1, **{f"train_{pid}": 1 for pid in plan.packs},
                "figure": len(sweep.figure_names(plan)), "claims": 1, "all": 1}
    assert planned_jobs(p.stdout + p.stderr) == expected, (p.stdout + p.stderr)[-3000:]
    assert not (wd / ".test" / "results").exists() and not (wd / "results").exists()


def test_bare_snakemake_uses_the_workstation_profile(done):
    wd, _ = done
    p = subprocess.run([str(BIN / "snakemake"), "-n", "--configfile", TEST_CONFIG], cwd=wd,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Using workflow specific profile profiles/default" in p.stdout + p.stderr
    assert (wd / "profiles" / "default").resolve() == (wd / "workflow" / "profiles" / "default").resolve()


def test_checkpoint_interval_comes_from_the_config_and_retrains_nothing(done):
    wd, _ = done
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["checkpoint_every"] = 2
    (wd / ".test" / "ckpt.yaml").write_text(yaml.safe_dump(cfg))
    assert _dry_run(wd, "--configfile", ".test/ckpt.yaml") == {}
    p = snakemake(wd, "--configfile", ".test/ckpt.yaml", "-n", "-p", "--forcerun", "train_" + next(
        iter(sweep.plan_from_file(wd / TEST_CONFIG).packs)), "--until", "all")
    assert "--checkpoint-every 2 --data-dir data" in p.stdout + p.stderr


def test_a_duplicate_key_in_the_config_file_fails_before_any_job(tmp_path):
    wd = copy_repo(tmp_path)
    text = (wd / TEST_CONFIG).read_text().replace("  lr: 0.05\n", "  lr: 0.05\n  lr: 5.0\n", 1)
    (wd / "dup.yaml").write_text(text)
    p = snakemake(wd, "--configfile", "dup.yaml", check=False)
    assert p.returncode != 0 and "duplicate key 'lr'" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert not (wd / "results").exists() and "rule " not in p.stdout


def test_an_alias_bomb_and_an_unknown_key_fail_before_the_schema_prints_the_config(tmp_path):
    from test_sweep import BOMB
    wd = copy_repo(tmp_path)
    (wd / "bomb.yaml").write_text(BOMB)
    t0 = time.time()
    p = snakemake(wd, "--configfile", "bomb.yaml", "-n", check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 120 and len(text) < 5000, text[-3000:]
    assert "bomb.yaml, line 1: YAML anchors and aliases are refused" in text, text[-3000:]
    (wd / "unknown.yaml").write_text((wd / TEST_CONFIG).read_text() + "figurse: {}\n")
    p = snakemake(wd, "--configfile", "unknown.yaml", "-n", check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "unknown key(s) 'figurse'" in text, text[-3000:]
    assert "Failed validating" not in text and "weight_decay" not in text, text[-3000:]
    assert not (wd / "results").exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty; expected a YAML mapping of top-level keys"),
    (b"- fig1\n- fig2\n", "expected a YAML mapping of top-level keys, got a list"),
    (b"figures:\n\tfig1: {}\n", "line 2: a tab in the indentation; YAML indents with spaces only"),
    (b"\x89PNG\r\n\x1a\n\x00", "not UTF-8 text (byte 0x89 at offset 0)"),
])
def test_a_bad_default_config_file_is_named_with_what_was_expected(tmp_path, content, expected):
    """Bare `snakemake` reads config/config.yaml (a --configfile, Snakemake's own
    reader loads before the workflow; see README)."""
    wd = copy_repo(tmp_path)
    (wd / "config" / "config.yaml").write_bytes(content)
    p = snakemake(wd, "-n", check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "invalid config: config file config/config.yaml" in text, text[-3000:]
    assert expected in text, text[-3000:]
    assert "UnicodeDecodeError" not in text and not (wd / "results").exists()


# -- data: training reads data/, every dataset file is an output ---------------------------

def _two_datasets(wd) -> str:
    """fig1 on a small MNIST subset, fig2 on the synthetic set."""
    cfg = yaml.safe_load((wd / TEST_CONFIG).read_text())
    cfg["defaults"]["epochs"] = 2
    cfg["figures"] = {"fig1": {"model": "MLP-2-16", "dataset": "mnist", "train_subset": 256,
                               "test_subset": 100},
                      "fig2": {"model": "MLP-2-16"}}
    (wd / "two.yaml").write_text(yaml.safe_dump(cfg))
    return "two.yaml"


@needs_mnist
def test_dataset_files_are_fetched_again_and_training_reads_only_data(tmp_path):
    wd = copy_repo(tmp_path)
    two = _two_datasets(wd)
    snakemake(wd, "--configfile", two)
    plan = sweep.plan_from_file(wd / two)
    mnist_trains = {f"train_{pid}" for pid in plan.packs if plan.pack_specs(pid)[0].dataset == "mnist"}
    assert mnist_trains and len(mnist_trains) < len(plan.packs)

    # A dataset file gone (as `rankbias restore` moves a bad one aside): the next run
    # fetches it again; only the runs on that dataset depend on it.
    gone = wd / "data" / "mnist" / "t10k-labels-idx1-ubyte"
    gone.unlink()
    jobs = _dry_run(wd, "--configfile", two)
    assert jobs.get("data_mnist") == 1 and "data_synthetic" not in jobs, jobs
    assert {j for j in jobs if j.startswith("train_")} == mnist_trains, jobs
    snakemake(wd, "--configfile", two)
    assert hashlib.md5(gone.read_bytes()).hexdigest() == datasets.MNIST_MD5[gone.name]

    # A bad manifest (what restore moves aside, then asks Snakemake what derives from
    # it): the dataset is fetched again and nothing retrains or redraws.
    (wd / "data" / "mnist" / "manifest.json").unlink()
    jobs = _dry_run(wd, "--configfile", two, "--forcerun", "data/mnist/manifest.json")
    assert jobs.get("data_mnist") == 1 and not {"figure", "claims"} & set(jobs), jobs
    assert not any(j.startswith("train_") for j in jobs), jobs
    snakemake(wd, "--configfile", two)

    # Training reads the copy its rule declares, not $RANKBIAS_DATA (which holds a good one).
    bad = wd / "data" / "mnist" / "train-labels-idx1-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    job = min(mnist_trains)
    p = snakemake(wd, "--configfile", two, "--forcerun", job, "--until", job, check=False)
    assert p.returncode != 0
    log = (wd / "results" / "logs" / "train" / f"{job[len('train_'):]}.log").read_text()
    assert "checksum mismatch" in log and "data/mnist/train-labels-idx1-ubyte" in log, log[-2000:]


def test_make_works_in_a_checkout_path_with_a_space(tmp_path):
    """`make reproduce` and `make test` (here with the existing venv, and a smaller
    target and test selection) in a directory whose path holds a space."""
    wd = copy_repo(tmp_path / "a checkout")
    venv = BIN.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MAKE"))}
    env.update(PYTHONPATH=str(wd / "src"), RANKBIAS_OFFLINE="1")
    make = ["make", "-C", str(wd), f"VENV={venv}", "-o", str(venv / ".installed")]
    p = subprocess.run([*make, "reproduce", "CORES=2",
                        "SNAKEMAKE_ARGS=results/figures/fig4.png --configfile .test/config.yaml"],
                       env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert (wd / "results" / "figures" / "fig4.png").stat().st_size > 1000
    assert f"Figures: {wd}/results/figures/fig1.png" in p.stdout
    p = subprocess.run([*make, "test-fast", "TESTS=tests/test_cluster.py"], env=env,
                       capture_output=True, text=True, timeout=1200, check=False)
    assert p.returncode == 0 and " passed" in p.stdout, (p.stdout + p.stderr)[-4000:]
