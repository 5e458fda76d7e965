"""`rankbias audit`: the provenance tree, and every kind of mismatch named."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from fabricate import fabricate  # noqa: E402
from rankbias.verify import audit as A  # noqa: E402
from rankbias.store import provenance as P  # noqa: E402
from rankbias.verify import dvcstate  # noqa: E402
from rankbias.verify import restore as R  # noqa: E402
from rankbias.cli import main  # noqa: E402
from rankbias.store.results import RECORD_HASH, load_runs, record_hash  # noqa: E402
from rankbias.core.spec import RunSpec  # noqa: E402

FIG = "results/figures/fig2.png"


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A git repository with two runs and fig2 drawn from them."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "code.py").write_text("x = 1\n")
    (root / "README.md").write_text("docs\n")
    (root / ".gitignore").write_text("/results/\n/.dvc/cache/\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "code")
    monkeypatch.chdir(root)
    for seed in (0, 1):
        fabricate(root / "results/runs", RunSpec(dataset="synthetic", arch="mlp", depth=2, width=8,
                                                 epochs=2, seed=seed))
    runs = load_runs(root / "results/runs")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    P.save_figure(fig, root / FIG, root / FIG.replace(".png", ".pdf"),
                  P.figure_provenance(runs, {}, "fig2", root=root))
    plt.close(fig)
    return root


def audit(root, capsys, figure=FIG):
    rc = main(["audit", str(figure), "--root", str(root)])
    return rc, capsys.readouterr().out


def mismatches(out):
    return [line for line in out.splitlines() if line.startswith("MISMATCH")]


def test_clean_tree_passes_and_prints_the_tree(tree, capsys):
    rc, out = audit(tree, capsys)
    assert rc == 0, out
    assert "audit: OK" in out and not mismatches(out)
    for run_id in (p.name for p in (tree / "results/runs").iterdir()):
        assert run_id in out
    assert "└── runs (2)" in out and "MLP-2-8" in out
    assert git(tree, "rev-parse", "HEAD")[:12] in out
    rc, out = audit(tree, capsys, FIG.replace(".png", ".pdf"))
    assert rc == 0, out


def test_tampered_metrics_named(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[1]
    f = run / "metrics.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    rc, out = audit(tree, capsys)
    assert rc == 1
    lines = mismatches(out)
    assert lines and all(f"results/runs/{run.name}/metrics.parquet" in x for x in lines), lines


def test_consistent_rewrite_of_a_run_is_still_caught(tree, capsys):
    """Changing a file AND its hash in run.json AND the record's own hash still differs
    from the figure's record."""
    run = sorted((tree / "results/runs").iterdir())[0]
    f = run / "spectra.npz"
    f.write_bytes(f.read_bytes() + b"\0")
    info = json.loads((run / "run.json").read_text())
    info["files"]["spectra.npz"] = hashlib.sha256(f.read_bytes()).hexdigest()
    info[RECORD_HASH] = record_hash(info)
    (run / "run.json").write_text(json.dumps(info))
    rc, out = audit(tree, capsys)
    text = "\n".join(mismatches(out))
    assert rc == 1
    assert f"results/runs/{run.name}/spectra.npz: sha256 differs from the one the figure recorded" in text
    # run.json is named once: not the one training wrote (its training record, outside
    # results/, says so before the figure's record does).
    assert f"results/runs/{run.name}/run.json: not the run.json a training job wrote" in text
    assert sum(f"results/runs/{run.name}/run.json:" in x for x in mismatches(out)) == 1


def test_each_differing_file_is_named_once(tree, capsys):
    """A file that differs from run.json (named by Run.verify) and one rewritten together
    with run.json (differs only from the figure's record): one line each, plus run.json."""
    run = sorted((tree / "results/runs").iterdir())[0]
    m = run / "metrics.parquet"
    m.write_bytes(m.read_bytes() + b"\0")
    s = run / "spectra.npz"
    s.write_bytes(s.read_bytes() + b"\0")
    info = json.loads((run / "run.json").read_text())
    info["files"]["spectra.npz"] = hashlib.sha256(s.read_bytes()).hexdigest()
    info[RECORD_HASH] = record_hash(info)
    (run / "run.json").write_text(json.dumps(info))
    rc, out = audit(tree, capsys)
    lines = mismatches(out)
    assert rc == 1
    for name in ("metrics.parquet", "spectra.npz", "run.json"):
        assert sum(f"results/runs/{run.name}/{name}:" in x for x in lines) == 1, lines
    assert len(lines) == 3, lines


def test_missing_run_file_named_once(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[1]
    (run / "layers.parquet").unlink()
    rc, out = audit(tree, capsys)
    assert rc == 1
    assert mismatches(out) == [f"MISMATCH results/runs/{run.name}/layers.parquet: missing"], out


def test_sidecar_that_is_not_json_is_named(tree, capsys):
    (tree / "results/figures/fig2.provenance.json").write_text("{oops")
    rc, out = audit(tree, capsys)
    assert rc == 1
    assert any(x.startswith("MISMATCH results/figures/fig2.provenance.json: not valid JSON (")
               for x in mismatches(out)), out


def test_other_format_ignores_the_suffix_case():
    assert A.other_format(Path("f/fig.PNG")) == Path("f/fig.pdf")
    assert A.other_format(Path("f/fig.Pdf")) == Path("f/fig.png")
    assert A.other_format(Path("f/fig.png")) == Path("f/fig.pdf")


def _count_hashing(monkeypatch) -> Counter:
    """Count sha256 computations per file, wherever they happen (Run.verify or the audit)."""
    import rankbias.core.io as io
    import rankbias.store.provenance as provenance
    import rankbias.store.results as results
    import rankbias.verify.audit as audit

    counts: Counter = Counter()
    real = io.sha256_file

    def counting(path):
        counts[Path(path).resolve()] += 1
        return real(path)

    for module in (io, results, audit, provenance):
        monkeypatch.setattr(module, "sha256_file", counting)
    return counts


def test_each_run_file_is_hashed_once(tree, capsys, monkeypatch):
    runs = load_runs(tree / "results/runs")
    for name in ("fig3", "fig4"):  # more figures drawn from the same runs
        fig, ax = plt.subplots()
        ax.plot([1, 0])
        P.save_figure(fig, tree / f"results/figures/{name}.png", tree / f"results/figures/{name}.pdf",
                      P.figure_provenance(runs, {}, name, root=tree))
        plt.close(fig)
    run_files = sorted(p.resolve() for p in (tree / "results/runs").rglob("*") if p.is_file())
    counts = _count_hashing(monkeypatch)
    assert main(["restore", "--root", str(tree), "--check"]) == 0
    assert "2 run(s) and 3 figure(s) verified; 0 problem(s)" in capsys.readouterr().out
    assert sorted(counts) == run_files and set(counts.values()) == {1}, counts
    counts.clear()
    rc, out = audit(tree, capsys)
    assert rc == 0, out
    assert sorted(counts) == run_files and set(counts.values()) == {1}, counts


def test_missing_run_named(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[0]
    for f in run.iterdir():
        f.unlink()
    run.rmdir()
    rc, out = audit(tree, capsys)
    assert rc == 1 and f"results/runs/{run.name}: missing" in out


def test_sidecar_must_equal_embedded(tree, capsys):
    side = tree / "results/figures/fig2.provenance.json"
    rec = json.loads(side.read_text())
    rec["rank"]["tol"] = 0.5
    side.write_text(json.dumps(rec))
    rc, out = audit(tree, capsys)
    assert rc == 1
    assert any("fig2.provenance.json: differs from the provenance embedded" in x for x in mismatches(out))
    side.unlink()
    rc, out = audit(tree, capsys)
    assert rc == 1 and "fig2.provenance.json: provenance sidecar missing" in out


def test_code_changes_are_named(tree, capsys):
    (tree / "code.py").write_text("x = 2\n")
    rc, out = audit(tree, capsys)
    assert rc == 1 and any(x.startswith("MISMATCH code.py: differs from commit") for x in mismatches(out))
    git(tree, "commit", "-qam", "change code")
    rc, out = audit(tree, capsys)
    assert rc == 1 and "MISMATCH code.py" in out
    (tree / "code.py").write_text("x = 1\n")
    git(tree, "commit", "-qam", "revert")
    # Bookkeeping and prose commits after the figure are not code changes.
    (tree / "README.md").write_text("more docs\n")
    (tree / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git(tree, "add", "-A")
    git(tree, "commit", "-qm", "docs and lock")
    rc, out = audit(tree, capsys)
    assert rc == 0, out


def _write_lock(root: Path, png_md5: str) -> None:
    runs_md5, manifest = dvcstate.dir_md5(root / "results/runs")
    obj = dvcstate.cache_object(root, runs_md5)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_text(json.dumps([{"md5": m, "relpath": k} for k, m in sorted(manifest.items())]))
    fig = {"path": FIG, "hash": "md5", "md5": png_md5}
    lock = {"schema": "2.0", "stages": {"figure@fig2": {
        "cmd": "snakemake results/figures/fig2.png",
        "deps": [{"path": "results/runs", "hash": "md5", "md5": runs_md5}],
        "outs": [fig]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_dvc_lock_is_checked(tree, capsys):
    _write_lock(tree, dvcstate.md5_file(tree / FIG))
    rc, out = audit(tree, capsys)
    assert rc == 0, out
    # A run file that differs from the runs directory the figure's stage depended on.
    run = sorted((tree / "results/runs").iterdir())[0]
    f = run / "layers.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    rc, out = audit(tree, capsys)
    assert rc == 1
    assert f"MISMATCH results/runs/{run.name}/layers.parquet: md5 differs from results/runs as " \
           f"recorded in dvc.lock (stage figure@fig2)" in out
    # The figure itself differs from dvc.lock.
    _write_lock(tree, "0" * 32)
    rc, out = audit(tree, capsys)
    assert rc == 1 and any(x.startswith(f"MISMATCH {FIG}: md5 ") for x in mismatches(out))


def test_a_file_list_missing_from_the_cache_is_noted_only_for_results(tree, capsys):
    _write_lock(tree, dvcstate.md5_file(tree / FIG))
    lock = yaml.safe_load((tree / "dvc.lock").read_text())
    runs_md5 = lock["stages"]["figure@fig2"]["deps"][0]["md5"]
    # src and workflow are dependencies git versions: DVC pulls no file list of them.
    lock["stages"]["figure@fig2"]["deps"] += [{"path": d, "hash": "md5", "md5": f"{c * 32}.dir"}
                                              for d, c in (("src", "a"), ("workflow", "b"))]
    lock["stages"]["runs"] = {"cmd": "snakemake", "outs": [{"path": "results/runs", "hash": "md5",
                                                            "md5": runs_md5}]}
    (tree / "dvc.lock").write_text(yaml.safe_dump(lock))
    rc, out = audit(tree, capsys)
    assert rc == 0 and "note: dvc.lock" not in out, out
    dvcstate.cache_object(tree, runs_md5).unlink()
    rc, out = audit(tree, capsys)
    notes = [line for line in out.splitlines() if line.startswith("note: dvc.lock")]
    assert rc == 0 and notes == [f"note: dvc.lock: the file list {runs_md5} of results/runs is not in "
                                 f"the DVC cache, so run files are not checked against it; "
                                 f"`dvc pull runs` fetches it"], out


def test_params_yaml_is_bookkeeping_not_code(tree, capsys):
    """docs/provenance.md: set params.yaml to the config the results came from before `dvc commit`,
    after the figures were made, and commit it with dvc.lock."""
    (tree / "params.yaml").write_text("configfile: config/config.yaml\n")
    git(tree, "add", "-A")
    git(tree, "commit", "-qm", "params")
    rc, out = audit(tree, capsys)
    assert rc == 0, out
    (tree / "params.yaml").write_text("configfile: .test/config.yaml\n")
    rc, out = audit(tree, capsys)
    assert rc == 0, out
    git(tree, "commit", "-qam", "results")
    rc, out = audit(tree, capsys)
    assert rc == 0, out


def test_usage_errors_exit_2(tree, capsys):
    assert main(["audit", "results/figures/nope.png", "--root", str(tree)]) == 2
    (tree / "results/figures/fig2.svg").write_text("<svg/>")
    assert main(["audit", "results/figures/fig2.svg", "--root", str(tree)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["audit"])
    assert e.value.code == 2


def test_figure_without_provenance_is_a_mismatch(tree, capsys):
    fig, _ = plt.subplots()
    fig.savefig(tree / "results/figures/plain.png")
    plt.close(fig)
    rc, out = audit(tree, capsys, "results/figures/plain.png")
    assert rc == 1 and "plain.png: embedded provenance unreadable" in out


def test_json_report(tree, capsys):
    rc = main(["audit", FIG, "--root", str(tree), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["ok"] and rep["mismatches"] == [] and rep["provenance"]["figure"] == "fig2"


# -- rankbias restore without DVC or Snakemake (the integration test has both) ----------

def test_restore_moves_a_tampered_run_and_the_figures_drawn_from_it(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[0]
    f = run / "metrics.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/runs/{run.name}: metrics.parquet: sha256 differs" in out
    assert "fig2.png: drawn from run(s) that failed verification" in out
    assert run.exists() and (tree / FIG).exists()  # --check changes nothing
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    moved = sorted(p.relative_to(tree / "results/quarantine").as_posix()
                   for p in (tree / "results/quarantine").rglob("*") if p.is_file())
    stamp = moved[0].split("/")[0]
    assert moved == sorted([f"{stamp}/figures/fig2.{x}" for x in ("pdf", "png", "provenance.json", "provenance.html")]
                           + [f"{stamp}/runs/{run.name}/{x}" for x in
                              ("layers.parquet", "metrics.parquet", "run.json", "spectra.npz")])
    assert not run.exists() and not (tree / FIG).exists()
    # What is left verifies.
    assert main(["restore", "--root", str(tree)]) == 0
    assert "1 run(s) and 0 figure(s) verified; 0 problem(s)" in capsys.readouterr().out


def test_restore_names_a_run_whose_id_does_not_match_its_spec(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[0]
    info = json.loads((run / "run.json").read_text())
    info["spec"]["seed"] = 99
    (run / "run.json").write_text(json.dumps(info))
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    assert f"results/runs/{run.name}: " in capsys.readouterr().out


def test_planned_outputs_reads_a_dry_run():
    text = """Building DAG of jobs...
[Mon Nov 23 13:52:15 2026]
rule train_abc:
    input: results/packs/abc.json
    output: results/runs/a/run.json, results/runs/b/run.json
    jobid: 4
localrule figure:
    input: results/runs/a/run.json
    output: results/figures/fig1.png, results/figures/fig1.pdf
    jobid: 1
"""
    assert R.planned_outputs(text) == [
        ("train_abc", ["results/runs/a/run.json", "results/runs/b/run.json"]),
        ("figure", ["results/figures/fig1.png", "results/figures/fig1.pdf"])]


# -- paths from dvc.lock and provenance records stay inside the repository -------------

def _victim(tree: Path) -> Path:
    victim = tree.parent / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("not the pipeline's\n")
    victim.chmod(0o444)
    return victim


def _lock_with(root: Path, path: str, md5: str) -> None:
    lock = {"schema": "2.0", "stages": {"crafted": {"cmd": "true", "outs": [
        {"path": path, "hash": "md5", "md5": md5}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "md5 into a cache path"])
def test_restore_never_touches_a_file_outside_the_repository(tree, capsys, case):
    victim = _victim(tree)
    if case == "absolute":
        path, md5 = str(victim), "0" * 32
    elif case == "dotdot":
        path, md5 = "../outside/victim.txt", "0" * 32
    elif case == "symlink":
        (tree / "results" / "escape").symlink_to(victim.parent, target_is_directory=True)
        path, md5 = "results/escape/victim.txt", "0" * 32
    else:   # a hash that makes the "corrupt cache object" the victim
        path, md5 = FIG, ".." + str(victim)
    _lock_with(tree, path, md5)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    if case == "symlink":   # the link is named, and neither it nor its target is touched
        assert f"FAILED results/escape: a symbolic link (to {victim.parent})" in out, out
    else:
        assert f"FAILED dvc.lock: dvc.lock stage crafted out {path!r}:" in out and "refused" in out, out
    assert victim.read_text() == "not the pipeline's\n"
    assert victim.stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_a_file_list_entry_that_leaves_the_repository_is_refused(tree, capsys):
    victim = _victim(tree)
    listing = json.dumps([{"md5": "0" * 32, "relpath": "../../../outside/victim.txt"}])
    md5 = hashlib.md5(listing.encode()).hexdigest() + ".dir"
    obj = dvcstate.cache_object(tree, md5)
    obj.parent.mkdir(parents=True)
    obj.write_text(listing)
    _lock_with(tree, "results/runs", md5)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "entry '../../../outside/victim.txt'" in out and "refused" in out, out
    assert victim.read_text() == "not the pipeline's\n" and victim.stat().st_mode & 0o777 == 0o444


def test_a_figure_record_naming_a_run_outside_results_is_a_mismatch(tree, capsys):
    import shutil

    runs = load_runs(tree / "results/runs")
    elsewhere = tree.parent / "elsewhere" / runs[0].path.name
    shutil.copytree(runs[0].path, elsewhere)
    record = P.figure_provenance(runs, {}, "fig2", root=tree)
    record["runs"][0]["path"] = str(elsewhere)
    fig, _ = plt.subplots()
    P.save_figure(fig, tree / FIG, tree / FIG.replace(".png", ".pdf"), record)
    plt.close(fig)
    rc, out = audit(tree, capsys)
    assert rc == 1
    assert any(f"run {runs[0].run_id}: path {str(elsewhere)!r}" in x and "outside" in x
               for x in mismatches(out)), out


# -- every field of a run record is checked --------------------------------------------

def test_an_injected_field_in_run_json_fails_restore_and_audit(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[0]
    info = json.loads((run / "run.json").read_text())
    info["diverged"] = {"epoch": 1, "reason": "injected"}
    (run / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/runs/{run.name}: run.json: edited after it was written" in out
    rc, out = audit(tree, capsys)
    assert rc == 1 and f"MISMATCH results/runs/{run.name}/run.json: edited after it was written" in out


def test_untracked_code_is_a_code_change(tree, capsys):
    (tree / "new_module.py").write_text("import os\n")
    rc, out = audit(tree, capsys)
    assert rc == 1 and any(x.startswith("MISMATCH new_module.py: not tracked by git") for x in mismatches(out))
    with open(tree / ".git" / "info" / "exclude", "a") as f:   # ignored files are not code
        f.write("new_module.py\n")
    rc, out = audit(tree, capsys)
    assert rc == 0, out


# -- the claims table has provenance and an audit ---------------------------------------

def test_claims_are_audited_like_a_figure(tree, capsys):
    from rankbias.analysis import claims

    claims.run_claims(None, tree / "results/runs", tree / "results/claims")
    record = json.loads((tree / "results/claims.provenance.json").read_text())
    assert record["figure"] == "claims" and set(record["outputs"]) == {"claims.md", "claims.json"}
    assert {r["run_id"] for r in record["runs"]} == {p.name for p in (tree / "results/runs").iterdir()}
    assert all(len(r["run_json_sha256"]) == 64 for r in record["runs"])
    rc, out = audit(tree, capsys, "results/claims.md")
    assert rc == 0 and "audit: OK" in out, out
    assert main(["restore", "--root", str(tree), "--check"]) == 0
    assert "2 run(s) and 2 figure(s) verified" in capsys.readouterr().out
    md = tree / "results/claims.md"
    md.write_text(md.read_text().replace("**", "__", 1))
    rc, out = audit(tree, capsys, "results/claims.md")
    assert rc == 1 and "MISMATCH results/claims.md: sha256 differs from the one " \
                       "results/claims.provenance.json records" in out
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    capsys.readouterr()
    md.write_text(md.read_text().replace("__", "**", 1))
    run = sorted((tree / "results/runs").iterdir())[0]
    f = run / "layers.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    rc, out = audit(tree, capsys, "results/claims.md")
    assert rc == 1 and f"MISMATCH results/runs/{run.name}/layers.parquet" in out


def test_audit_and_restore_import_in_one_direction():
    """DVC state lives in dvcstate and the per-run check in results: the audit needs
    nothing of restore, which builds on the audit."""
    code = ("import sys, rankbias.verify.audit; assert 'rankbias.verify.restore' not in sys.modules, 'audit imports restore'; "
            "import rankbias.verify.restore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(A.__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr


# -- restore never acts through a symbolic link, nor outside data/ and results/ ----------

def _tamper_a_run(tree: Path) -> Path:
    run = sorted((tree / "results/runs").iterdir())[0]
    f = run / "metrics.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    return run


def _outside(tree: Path, name: str = "outside") -> Path:
    d = tree.parent / name
    d.mkdir()
    return d


def _listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): (b"-> " + os.readlink(p).encode()) if p.is_symlink()
            else p.read_bytes() for p in sorted(d.rglob("*")) if p.is_symlink() or p.is_file()}


def test_a_symlinked_figure_failing_verification_leaves_its_target_alone(tree, capsys):
    fig = tree / FIG
    target = _outside(tree) / "fig2.png"
    target.write_bytes(fig.read_bytes())
    fig.unlink()
    fig.symlink_to(target)
    _tamper_a_run(tree)
    before = _listing(target.parent)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {FIG}: a symbolic link (to {target})" in out, out
    assert _listing(target.parent) == before and not target.is_symlink()
    assert fig.is_symlink() and os.readlink(fig) == str(target)   # neither it nor its target moved
    assert "did not run snakemake --touch" in out   # it would mark the link up to date


def test_a_symlinked_run_directory_is_named_not_followed(tree, capsys):
    run = sorted((tree / "results/runs").iterdir())[0]
    elsewhere = _outside(tree) / run.name
    run.rename(elsewhere)
    run.symlink_to(elsewhere, target_is_directory=True)
    before = _listing(elsewhere.parent)
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/runs/{run.name}: a symbolic link (to {elsewhere})" in out, out
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/runs/{run.name}: a symbolic link (to {elsewhere})" in out, out
    assert _listing(elsewhere.parent) == before and run.is_symlink()
    # The figure drawn from it is a real file, so it is moved aside; the link is not.
    assert not (tree / FIG).exists() and "drawn from run(s) that failed verification" in out


def test_a_symlinked_results_subdirectory_is_named_and_nothing_beneath_it_moves(tree, capsys):
    figs = tree / "results/figures"
    elsewhere = _outside(tree) / "figures"
    figs.rename(elsewhere)
    figs.symlink_to(elsewhere, target_is_directory=True)
    _tamper_a_run(tree)
    before = _listing(elsewhere)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/figures: a symbolic link (to {elsewhere})" in out, out
    assert _listing(elsewhere) == before


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_quarantine_that_is_not_a_real_directory_is_refused(tree, capsys, kind):
    q = tree / "results/quarantine"
    outside = _outside(tree)
    if kind == "symlink":
        q.symlink_to(outside, target_is_directory=True)
    else:
        q.write_text("not a directory\n")
    run = _tamper_a_run(tree)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "FAILED results/quarantine: " in out and "expected a real directory" in out, out
    assert list(outside.iterdir()) == []
    assert run.is_dir() and (tree / FIG).is_file()   # nothing moved


def _cache_config(tree: Path, **cache: str) -> None:
    (tree / ".dvc").mkdir(exist_ok=True)
    (tree / ".dvc/config").write_text("[cache]\n" + "".join(f"    {k} = {v}\n" for k, v in cache.items()))


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_corrupt_cache_object_is_reported_never_deleted(tree, capsys, where):
    if where == "outside":
        _cache_config(tree, dir=str(_outside(tree, "shared-cache")))
    want = dvcstate.md5_file(tree / FIG)
    obj = dvcstate.cache_object(tree, want)
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"corrupt")
    obj.chmod(0o444)
    _write_lock(tree, want)
    fig = tree / FIG
    fig.write_bytes(fig.read_bytes() + b"\0")
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(f"FAILED {FIG}: md5 "))
    assert f"the DVC cache object {obj if where == 'outside' else dvcstate.cache_object('.', want)}" \
           f" is corrupt" in line and "delete it" in line, out
    assert obj.read_bytes() == b"corrupt" and obj.stat().st_mode & 0o777 == 0o444


def test_a_symlink_cache_type_is_refused(tree, capsys):
    _cache_config(tree, type="symlink")
    run = _tamper_a_run(tree)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert "FAILED .dvc/config: cache.type 'symlink'" in out and "copy" in out, out
    assert run.is_dir() and (tree / FIG).is_file()   # nothing moved


def test_links_into_a_shared_cache_are_refused_and_the_cache_is_untouched(tree, capsys):
    """Files checked out as links into a shared cache (cache.type symlink set outside the
    repository's config): every link is named, no object is moved or deleted."""
    cache = _outside(tree, "shared-cache")
    _cache_config(tree, dir=str(cache))
    run = _tamper_a_run(tree)
    for f in sorted(run.iterdir()):
        obj = cache / "files/md5" / dvcstate.md5_file(f)[:2] / dvcstate.md5_file(f)[2:]
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(obj)
    runs_md5, manifest = dvcstate.dir_md5(tree / "results/runs")
    obj = dvcstate.cache_object(tree, runs_md5)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_text(json.dumps([{"md5": m, "relpath": k} for k, m in sorted(manifest.items())]))
    _lock_with(tree, "results/runs", runs_md5)
    before = _listing(cache)
    assert main(["restore", "--root", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED results/runs/{run.name}/metrics.parquet: a symbolic link" in out, out
    assert "cache.type" in out
    assert _listing(cache) == before
    # The run's real directory may be moved aside; the links in it stay links.
    assert sorted(p.name for p in (tree / "results").rglob("*") if p.is_symlink()) == \
        ["layers.parquet", "metrics.parquet", "run.json", "spectra.npz"]


# -- a figure's PNG, PDF and provenance are one set --------------------------------------

@pytest.mark.parametrize("member", ["pdf", "png", "provenance.json", "provenance.html"])
def test_a_figure_missing_one_of_its_files_fails_audit_and_restore(tree, capsys, member):
    gone = tree / FIG.replace(".png", "." + member)
    gone.unlink()
    name = FIG.replace(".png", "." + member)
    for fig in (FIG, FIG.replace(".png", ".pdf")):
        if (tree / fig).exists():
            rc, out = audit(tree, capsys, fig)
            assert rc == 1 and any(x.startswith(f"MISMATCH {name}: ") and "missing" in x
                                   for x in mismatches(out)), out
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    out = capsys.readouterr().out
    assert any(x.startswith(f"FAILED {name}: ") and "missing" in x for x in out.splitlines()), out
    assert main(["restore", "--root", str(tree)]) == 1
    capsys.readouterr()
    assert not any((tree / "results/figures").iterdir())   # the rest moved aside, redrawn next


def test_the_readable_page_shows_the_record_and_is_checked_against_it(tree, capsys):
    from rankbias.store.provenance_page import page_bytes, page_path

    page = page_path(tree / FIG)
    record = P.read_sidecar(tree / FIG)
    assert page.read_bytes() == page_bytes(record)
    text = page.read_text()
    for r in record["runs"]:
        assert r["run_id"] in text and r["run_json_sha256"] in text
    assert "<h1>Provenance of fig2</h1>" in text and "Runs (2)" in text
    assert record["environment"]["package"]["sources_sha256"] in text
    assert record["environment"]["code"]["commit"] in text
    # An edited (or stale) page is named by the audit, and restore moves the figure aside.
    page.write_text(text.replace("Runs (2)", "Runs (3)"))
    rc, out = audit(tree, capsys)
    assert rc == 1 and mismatches(out) == [
        "MISMATCH results/figures/fig2.provenance.html: differs from the page the provenance of "
        "results/figures/fig2.png renders (stale or edited)"], out
    assert main(["restore", "--root", str(tree)]) == 1
    assert "FAILED results/figures/fig2.provenance.html: differs" in capsys.readouterr().out
    assert not any((tree / "results/figures").iterdir())


def test_a_figure_member_out_of_step_fails_restore(tree, capsys):
    pdf = tree / FIG.replace(".png", ".pdf")
    runs = load_runs(tree / "results/runs")
    record = P.figure_provenance(runs[:1], {}, "fig2", root=tree)
    fig, _ = plt.subplots()
    P.save_figure(fig, tree / "elsewhere.png", pdf, record)   # a newer PDF beside the old PNG
    plt.close(fig)
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    assert "FAILED results/figures/fig2.pdf: its embedded provenance differs" in capsys.readouterr().out


@pytest.mark.parametrize("member", ["claims.md", "claims.json", "claims.provenance.json"])
def test_the_claims_missing_one_of_their_files_fail_restore_naming_it(tree, capsys, member):
    from rankbias.analysis import claims

    claims.run_claims(None, tree / "results/runs", tree / "results/claims")
    (tree / "results" / member).unlink()
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    out = capsys.readouterr().out
    assert any(x.startswith(f"FAILED results/{member}: ") and "missing" in x for x in out.splitlines()), out


# -- a consistent forgery is not laundered by the next redraw --------------------------

def _forge(run: Path) -> None:
    """Edit metrics.parquet and recompute every hash run.json holds, as someone with write
    access to results/ (but not to the training records outside it) can."""
    f = run / "metrics.parquet"
    f.write_bytes(f.read_bytes() + b"\0")
    info = json.loads((run / "run.json").read_text())
    info["files"]["metrics.parquet"] = hashlib.sha256(f.read_bytes()).hexdigest()
    info[RECORD_HASH] = record_hash(info)
    (run / "run.json").write_text(json.dumps(info))


def test_a_forged_run_is_not_redrawn_from(tree, capsys):
    """After a consistent forgery, a figure or claims job (what a plain `snakemake` runs
    because run.json is newer) refuses the run by name instead of redrawing from it, so
    audit and `restore --check` keep failing; restore moves it aside for retraining."""
    cfg = tree.parent / "config.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"dataset": "synthetic", "epochs": 2},
                                   "figures": {"fig2": {"model": "MLP-2-8", "grid": {"seed": [0, 1]}}}}))
    assert main(["figure", "fig2", "--config", str(cfg), "--runs", "results/runs", "--out", FIG]) == 0
    capsys.readouterr()
    run = sorted((tree / "results/runs").iterdir())[0]
    ledger = tree / ".rankbias" / "trained" / f"{run.name}.json"
    assert json.loads(ledger.read_text())["run_json_sha256"] == hashlib.sha256(
        (run / "run.json").read_bytes()).hexdigest()
    _forge(run)
    before = (tree / FIG).read_bytes()
    assert main(["figure", "fig2", "--config", str(cfg), "--runs", "results/runs", "--out", FIG]) == 1
    err = capsys.readouterr().err
    assert f"results/runs/{run.name}/run.json: not the run.json a training job wrote" in err, err
    assert ".rankbias/trained" in err and run.name in err
    assert (tree / FIG).read_bytes() == before                     # nothing redrawn
    from rankbias.analysis import claims
    with pytest.raises(RuntimeError, match=f"claims: refusing 1 run.*{run.name}"):
        claims.run_claims(None, tree / "results/runs", tree / "results/claims")
    rc, out = audit(tree, capsys)
    assert rc == 1 and f"MISMATCH results/runs/{run.name}/run.json: not the run.json a training" in out
    assert main(["restore", "--root", str(tree), "--check"]) == 1
    assert f"FAILED results/runs/{run.name}: run.json: not the run.json a training job wrote" \
        in capsys.readouterr().out
    # Retraining (any write by the trainer) is what may change a run.json.
    fabricate(tree / "results/runs", RunSpec(dataset="synthetic", arch="mlp", depth=2, width=8,
                                             epochs=2, seed=json.loads((run / "run.json").read_text())
                                             ["spec"]["seed"]), final_ranks=[3, 3])
    assert main(["figure", "fig2", "--config", str(cfg), "--runs", "results/runs", "--out", FIG]) == 0
    rc, out = audit(tree, capsys)
    assert rc == 0, out


def test_restore_vouches_for_pulled_runs_that_match_dvc_lock(tree, capsys):
    """Runs pulled from a remote have no training record here: restore records those that
    match the committed dvc.lock, after which a forgery of one is refused."""
    import shutil
    shutil.rmtree(tree / ".rankbias")
    _write_lock(tree, dvcstate.md5_file(tree / FIG))
    lock = yaml.safe_load((tree / "dvc.lock").read_text())
    runs_md5 = lock["stages"]["figure@fig2"]["deps"][0]["md5"]
    lock["stages"]["runs"] = {"cmd": "snakemake", "outs": [{"path": "results/runs", "hash": "md5",
                                                            "md5": runs_md5}]}
    (tree / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert main(["restore", "--root", str(tree), "--check"]) == 0, capsys.readouterr().out
    assert not (tree / ".rankbias").exists()                       # --check writes nothing
    assert main(["restore", "--root", str(tree), "--no-touch"]) == 0, capsys.readouterr().out
    runs = sorted((tree / "results/runs").iterdir())
    assert sorted(p.name for p in (tree / ".rankbias/trained").iterdir()) == sorted(
        f"{r.name}.json" for r in runs)
    # A record that differs (a run trained here, then `dvc checkout` of the committed one):
    # the run.json that equals dvc.lock is recorded again, not moved aside.
    ledger = tree / ".rankbias/trained" / f"{runs[0].name}.json"
    ledger.write_text(json.dumps({"run_json_sha256": "0" * 64}))
    rc, out = audit(tree, capsys)
    assert rc == 1 and f"results/runs/{runs[0].name}/run.json: not the run.json a training job" in out
    assert main(["restore", "--root", str(tree), "--check"]) == 0, capsys.readouterr().out
    assert main(["restore", "--root", str(tree), "--no-touch"]) == 0, capsys.readouterr().out
    assert json.loads(ledger.read_text())["run_json_sha256"] == hashlib.sha256(
        (runs[0] / "run.json").read_bytes()).hexdigest()
    (tree / "dvc.lock").unlink()
    _forge(runs[1])
    rc, out = audit(tree, capsys)
    assert rc == 1 and f"results/runs/{runs[1].name}/run.json: not the run.json a training job wrote" in out
