"""DVC round trip with real git, dvc and snakemake: run the tiny pipeline, commit and
push the results, clone, pull, restore, and check that nothing retrains; a corrupt
object in the DVC cache or remote is an error, never silently used."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEST_CONFIG, copy_repo, planned_jobs

from rankbias.verify import dvcstate

pytestmark = pytest.mark.slow

FIGS = ["fig1", "fig2"]
TARGETS = [f"results/figures/{f}.png" for f in FIGS]
STAGES = ["data", "runs", *[f"figure@{f}" for f in FIGS]]
CONFIG = ["--configfile", ".test/config.yaml"]
BIN = str(Path(sys.executable).parent)
# The remote the maintainer pushes to (.dvc/config): a directory beside the repository.
# The default remote, `public`, is the read-only HTTP(S) copy (tests/test_publish.py).
PUSH_REMOTE = "maintainer"


def sh(cwd, *cmd, check=True, env=None):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", **(env or {}))
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


def use_config(repo: Path, configfile: str) -> None:
    """Point DVC's stages at the config the results are built from (params.yaml)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["configfile"] = configfile
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def cache_object_of(repo: Path, f: Path) -> Path:
    return dvcstate.cache_object(repo, dvcstate.md5_file(f))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A repository whose tiny pipeline ran, committed to DVC and pushed."""
    return build_pushed(tmp_path_factory.mktemp("dvc"))


def build_pushed(base: Path) -> Path:
    """`base`/repo: the tiny pipeline's figures FIGS made, committed to DVC and git, and
    pushed to the maintainer's remote `base`/rankbias-dvc-remote; returns `base`."""
    repo = copy_repo(base / "repo")
    assert (repo / "dvc.yaml").exists() and (repo / ".dvc/config").exists()
    use_config(repo, TEST_CONFIG)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "code")
    sh(repo, "snakemake", *TARGETS, *CONFIG, "--cores", "2")
    sh(repo, "dvc", "commit", "-f", *STAGES)
    sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "push", "-r", PUSH_REMOTE, *STAGES)
    assert (base / "rankbias-dvc-remote" / "files" / "md5").is_dir()  # the maintainer's remote
    return base


def clone(base: Path, name: str, pull=True) -> Path:
    dest = base / name
    sh(base, "git", "clone", "-q", "repo", name)
    if pull:
        sh(dest, "dvc", "pull", "-r", PUSH_REMOTE, *STAGES)
    return dest


def test_dvc_lock_records_each_figure_and_our_hashes_agree_with_dvc(pushed):
    repo = pushed / "repo"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for fig in FIGS:
        outs = {o["path"]: o["md5"] for o in lock[f"figure@{fig}"]["outs"]}
        for suffix in (".png", ".pdf", ".provenance.json", ".provenance.html"):
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
    sh(repo, "dvc", "fetch", "-r", PUSH_REMOTE, *STAGES)
    prov = yaml.safe_load((pushed / "repo/results/figures/fig1.provenance.json").read_text())
    run_id = prov["runs"][0]["run_id"]
    obj = cache_object_of(repo, pushed / "repo/results/runs" / run_id / "metrics.parquet")
    obj.chmod(0o644)
    obj.write_bytes(b"corrupt" + obj.read_bytes())
    sh(repo, "dvc", "checkout", *STAGES, check=False)  # DVC itself copies the bad bytes
    p = restore(repo, check=False)
    assert p.returncode == 1
    line = next(x for x in p.stdout.splitlines() if f"results/runs/{run_id}/metrics.parquet" in x)
    assert "differs from" in line and "DVC cache object" in line and "corrupt: delete it" in line, p.stdout
    assert obj.exists()  # named, not deleted: restore changes nothing outside data/ and results/
    assert not (repo / "results/runs" / run_id).exists()
    jobs = dry_run(repo)
    assert any(j.startswith("train_") for j in jobs), jobs  # retrained, not used
    obj.chmod(0o644)
    obj.unlink()  # as the report says
    sh(repo, "dvc", "pull", "-r", PUSH_REMOTE, *STAGES)
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
        pull = sh(repo, "dvc", "pull", "-r", PUSH_REMOTE, *STAGES, check=False)
        assert pull.returncode != 0 and "results/figures" in pull.stdout + pull.stderr
        p = sh(repo, "rankbias", "restore", "--no-touch", check=False)
        assert p.returncode == 1
        assert "results/figures/fig2.pdf" in p.stdout, p.stdout
        f = repo / "results/figures/fig2.pdf"
        assert not f.exists() or dvcstate.md5_file(f) == md5  # never the corrupt bytes
    finally:
        obj.write_bytes(good)


@pytest.fixture(scope="module")
def committed(tiny_pipeline, tmp_path_factory):
    """A git repository holding the tiny pipeline's results, every stage committed to DVC."""
    outside, _ = tiny_pipeline
    repo = copy_repo(tmp_path_factory.mktemp("dvc_all") / "repo")
    for d in ("results", "data"):
        shutil.copytree(outside / d, repo / d, symlinks=True)
    use_config(repo, TEST_CONFIG)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "code")
    sh(repo, "dvc", "commit", "-f")
    sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "results")
    return repo


def test_metrics_are_the_claims_verdicts_and_effects(committed):
    shown = json.loads(sh(committed, "dvc", "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["results/claims.metrics.json"]["data"]
    claims = json.loads((committed / "results/claims.json").read_text())["claims"]
    assert {c["id"]: c["verdict"] for c in claims} == {
        k.split(".")[0]: v for k, v in metrics.items() if k.endswith(".verdict") and k.count(".") == 1}
    c1 = next(c for c in claims if c["id"] == "C1")
    mean = c1["spearman_in_claimed_direction"]["mean"]
    if mean is not None:
        assert metrics["C1.spearman_in_claimed_direction.mean"] == mean
    assert metrics["runs.judged"] == json.loads((committed / "results/claims.json").read_text())["runs"]["judged"]
    assert all(isinstance(v, (str, int, float)) for v in metrics.values())


def test_plots_are_the_figures(committed):
    out = committed / "plots"
    p = sh(committed, "dvc", "plots", "show", "--json", "-o", str(out))
    shown = json.loads(p.stdout)["data"]
    figures = {f"results/figures/fig{i}.png" for i in range(1, 8)}
    assert figures <= set(shown), sorted(shown)
    for fig in figures:
        (entry,) = shown[fig]
        assert entry["type"] == "image" and Path(entry["url"]).is_file()


def test_params_are_the_config_and_code_is_a_dependency(committed):
    repo = committed
    # The stages record the config the results were made from.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["runs"]["params"][TEST_CONFIG]["defaults"]["epochs"] == 3
    assert lock["runs"]["params"]["params.yaml"]["configfile"] == TEST_CONFIG
    assert all(f"--configfile {TEST_CONFIG}" in s["cmd"] for s in lock.values())
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert status == {}, status
    config = repo / TEST_CONFIG
    text = config.read_text()
    try:
        config.write_text(text.replace("  epochs: 3", "  epochs: 4"))
        diff = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)
        change = diff[TEST_CONFIG]["defaults.epochs"]
        assert (change["old"], change["new"]) == (3, 4), diff
        shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
        assert "workspace" in json.dumps(shown) and "C1.verdict" in json.dumps(shown)
    finally:
        config.write_text(text)
    # A code change shows in `dvc status` for every stage that runs the code.
    src = repo / "src" / "rankbias" / "analysis" / "claims.py"
    code = src.read_text()
    try:
        src.write_text(code + "\n# changed\n")
        status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
        assert {"runs", "claims", "figure@fig1"} <= set(status), status
    finally:
        src.write_text(code)


def test_readme_dvc_section_command_by_command_ends_with_audits_that_pass(tmp_path):
    """docs/provenance.md "DVC: commit, push and view the results" and "Restore without
    retraining" (linked from the README), as a researcher follows it: the pipeline runs,
    params.yaml is set to the config the results came from, `dvc commit -f`, git commit,
    `dvc push -r maintainer`; `dvc metrics show`, `rankbias claims --table`, `dvc plots show` and
    `snakemake --report report.html`; then a fresh clone: `dvc pull -r maintainer`, `rankbias restore`,
    `snakemake -n` (nothing), the same viewing commands, and `rankbias audit` of every
    figure and the claims passes in both, with no note that asks for another pull."""
    repo = copy_repo(tmp_path / "repo")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "code")
    run = sh(repo, "snakemake", *CONFIG, "--cores", "2")            # the pipeline has run
    # ... with each pack's progress and the whole run's estimate on the terminal
    shown = run.stdout + run.stderr
    assert re.search(r"^\[pack [0-9a-f]{12}\] epoch 3/3 loss \d\.\d{4} mean rank \S+ ETA 0s$", shown, re.M), shown
    assert re.search(r"^\[run\] \d+ pack\(s\) to train: about ", shown, re.M), shown
    assert re.search(r"^\[run\] (\d+)/\1 pack\(s\) trained, .* so far; training done$", shown, re.M), shown
    use_config(repo, TEST_CONFIG)              # "Set it to the config your results came from"
    sh(repo, "dvc", "commit", "-f")
    sh(repo, "git", "add", "dvc.lock", "params.yaml")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "push", "-r", "maintainer")
    outputs = sorted(str(p.relative_to(repo)) for p in (repo / "results/figures").glob("*.png"))
    assert len(outputs) == 12, outputs
    outputs.append("results/claims.md")

    def look_and_audit(wd: Path) -> None:
        metrics = sh(wd, "dvc", "metrics", "show").stdout
        assert "results/claims.metrics.json" in metrics, metrics
        table = sh(wd, "rankbias", "claims", "--table").stdout.splitlines()
        assert [line.split()[0] for line in table[1:11]] == [f"C{i}" for i in range(1, 8)] + ["T1", "T2", "T3"]
        sh(wd, "dvc", "plots", "show")
        assert (wd / "dvc_plots" / "index.html").is_file()
        sh(wd, "snakemake", *CONFIG, "--report", "report.html", "--cores", "1")
        assert (wd / "report.html").is_file()
        assert sh(wd, "git", "status", "--porcelain", "--untracked-files=all").stdout.strip() == ""
        for out in outputs:
            p = sh(wd, "rankbias", "audit", out, check=False)
            assert p.returncode == 0 and "audit: OK" in p.stdout, f"{wd.name}: {out}\n{p.stdout[-3000:]}"
            notes = [line for line in p.stdout.splitlines() if line.startswith("note:")]
            assert notes == [], f"{wd.name}: {out}: {notes}"

    look_and_audit(repo)
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", "repo", "clone")
    sh(clone, "dvc", "pull", "-r", "maintainer")
    p = sh(clone, "rankbias", "restore", "--", *CONFIG)
    assert "0 problem(s)" in p.stdout, p.stdout
    p = sh(clone, "snakemake", "-n", *CONFIG, "--cores", "1")
    assert "Nothing to be done" in p.stdout + p.stderr, p.stdout + p.stderr
    look_and_audit(clone)
