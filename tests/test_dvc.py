"""DVC round trip with real git, dvc and snakemake: run the tiny pipeline, commit and
push the results, clone, pull, restore, and check that nothing retrains; a corrupt
object in the DVC cache or remote is an error, never silently used."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, planned_jobs

from rankbias import dvcstate

pytestmark = pytest.mark.slow

FIGS = ["fig1", "fig2"]
TARGETS = [f"results/figures/{f}.png" for f in FIGS]
STAGES = ["data", "runs", *[f"figure@{f}" for f in FIGS]]
CONFIG = ["--configfile", ".test/config.yaml"]
BIN = str(Path(sys.executable).parent)


def sh(cwd, *cmd, check=True):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    p = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def dry_run(cwd) -> dict[str, int]:
    p = sh(cwd, "snakemake", "-n", *TARGETS, *CONFIG, "--cores", "1")
    out = p.stdout + p.stderr
    jobs = planned_jobs(out)
    assert jobs or "Nothing to be done" in out, out
    return jobs


def restore(cwd, *extra, check=True):
    return sh(cwd, "rankbias", "restore", *extra, "--", *TARGETS, *CONFIG, check=check)


def cache_object_of(repo: Path, f: Path) -> Path:
    return dvcstate.cache_object(repo, dvcstate.md5_file(f))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A repository whose tiny pipeline ran, committed to DVC and pushed."""
    base = tmp_path_factory.mktemp("dvc")
    repo = copy_repo(base / "repo")
    assert (repo / "dvc.yaml").exists() and (repo / ".dvc/config").exists()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "code")
    sh(repo, "snakemake", *TARGETS, *CONFIG, "--cores", "2")
    sh(repo, "dvc", "commit", "-f", *STAGES)
    sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "push", *STAGES)
    assert (base / "rankbias-dvc-remote" / "files" / "md5").is_dir()  # the default remote
    return base


def clone(base: Path, name: str, pull=True) -> Path:
    dest = base / name
    sh(base, "git", "clone", "-q", "repo", name)
    if pull:
        sh(dest, "dvc", "pull", *STAGES)
    return dest


def test_dvc_lock_records_each_figure_and_our_hashes_agree_with_dvc(pushed):
    repo = pushed / "repo"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for fig in FIGS:
        outs = {o["path"]: o["md5"] for o in lock[f"figure@{fig}"]["outs"]}
        for suffix in (".png", ".pdf", ".provenance.json"):
            path = f"results/figures/{fig}{suffix}"
            assert outs[path] == dvcstate.md5_file(repo / path)
        deps = {d["path"]: d["md5"] for d in lock[f"figure@{fig}"]["deps"]}
        # Our directory hash equals DVC's (the audit relies on reading it the same way).
        assert deps["results/runs"] == dvcstate.dir_md5(repo / "results/runs")[0]
        assert dvcstate.dir_manifest(repo, deps["results/runs"]) == dvcstate.dir_md5(repo / "results/runs")[1]


def test_pull_and_restore_plan_no_training(pushed):
    repo = clone(pushed, "clone")
    p = restore(repo)
    assert "0 problem(s)" in p.stdout, p.stdout
    jobs = dry_run(repo)
    assert jobs == {}, jobs
    # The figure is fully accounted for in the clone: runs, dvc.lock, code.
    p = sh(repo, "rankbias", "audit", "results/figures/fig2.png")
    assert "audit: OK" in p.stdout
    # Tampering with one run's metrics: the audit fails and names the file.
    prov = yaml.safe_load((repo / "results/figures/fig2.provenance.json").read_text())
    run_id = prov["runs"][0]["run_id"]
    f = repo / "results/runs" / run_id / "metrics.parquet"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    p = sh(repo, "rankbias", "audit", "results/figures/fig2.png", check=False)
    assert p.returncode == 1
    bad = [x for x in p.stdout.splitlines() if x.startswith("MISMATCH")]
    assert bad and all(f"results/runs/{run_id}/metrics.parquet" in x for x in bad), p.stdout
    # Restore moves the tampered run and its figure aside; snakemake retrains that pack only.
    p = restore(repo, check=False)
    assert p.returncode == 1 and f"results/runs/{run_id}/metrics.parquet" in p.stdout
    assert not (repo / "results/runs" / run_id).exists()
    jobs = dry_run(repo)
    assert sum(n for j, n in jobs.items() if j.startswith("train_")) == 1, jobs
    assert jobs.get("figure") == 1, jobs


def test_corrupt_cache_object_is_an_error_not_used(pushed):
    repo = clone(pushed, "clone_cache", pull=False)
    sh(repo, "dvc", "fetch", *STAGES)
    prov = yaml.safe_load((pushed / "repo/results/figures/fig1.provenance.json").read_text())
    run_id = prov["runs"][0]["run_id"]
    obj = cache_object_of(repo, pushed / "repo/results/runs" / run_id / "metrics.parquet")
    obj.chmod(0o644)
    obj.write_bytes(b"corrupt" + obj.read_bytes())
    sh(repo, "dvc", "checkout", *STAGES, check=False)  # DVC itself copies the bad bytes
    p = restore(repo, check=False)
    assert p.returncode == 1
    line = next(x for x in p.stdout.splitlines() if f"results/runs/{run_id}/metrics.parquet" in x)
    assert "differs from" in line and "DVC cache object" in line and "corrupt" in line, p.stdout
    assert not obj.exists()  # removed, so the next pull fetches a good copy
    assert not (repo / "results/runs" / run_id).exists()
    jobs = dry_run(repo)
    assert any(j.startswith("train_") for j in jobs), jobs  # retrained, not used
    sh(repo, "dvc", "pull", *STAGES)
    assert dvcstate.md5_file(obj) == obj.parent.name + obj.name  # a good copy again


def test_corrupt_remote_object_fails_the_pull_clearly(pushed):
    remote = pushed / "rankbias-dvc-remote"
    src = pushed / "repo/results/figures/fig2.pdf"
    md5 = dvcstate.md5_file(src)
    obj = remote / "files" / "md5" / md5[:2] / md5[2:]
    good = obj.read_bytes()
    try:
        obj.chmod(0o644)
        obj.write_bytes(b"corrupt" + good)
        repo = clone(pushed, "clone_remote", pull=False)
        pull = sh(repo, "dvc", "pull", *STAGES, check=False)
        assert pull.returncode != 0 and "results/figures" in pull.stdout + pull.stderr
        p = sh(repo, "rankbias", "restore", "--no-touch", check=False)
        assert p.returncode == 1
        assert "results/figures/fig2.pdf" in p.stdout, p.stdout
        f = repo / "results/figures/fig2.pdf"
        assert not f.exists() or dvcstate.md5_file(f) == md5  # never the corrupt bytes
    finally:
        obj.write_bytes(good)
