"""Provenance records: the environment, a figure's record, and the record embedded in
PNG and PDF (read back with Pillow and with raw bytes, independently of the writer)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import zlib
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from fabricate import fabricate  # noqa: E402
from rankbias.store import provenance as P  # noqa: E402
from rankbias.store.results import Run, load_runs  # noqa: E402
from rankbias.core.spec import RunSpec  # noqa: E402


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    (r / "code.py").write_text("x = 1\n")
    git(r, "add", "code.py")
    git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    return r


def test_code_version_follows_git(repo, tmp_path):
    head = git(repo, "rev-parse", "HEAD")
    assert P.code_version(repo) == {"commit": head, "dirty": False, "describe": head[:12]}
    (repo / "code.py").write_text("x = 2\n")
    v = P.code_version(repo)
    assert v["commit"] == head and v["dirty"] is True and v["describe"].endswith("-dirty")
    outside = tmp_path / "plain"
    outside.mkdir()
    assert P.code_version(outside) == {"commit": None, "dirty": None, "describe": None}


def test_collect_reports_the_environment(repo, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("RANKBIAS_IMAGE_DIGEST", "sha256:" + "ab" * 32)
    monkeypatch.setenv("RANKBIAS_IMAGE", "ghcr.io/x/rankbias:1")
    env = P.collect()
    assert env["code"]["commit"] == git(repo, "rev-parse", "HEAD")
    for name in ("torch", "numpy", "pandas", "snakemake", "dvc", "matplotlib"):
        assert env["packages"][name] == metadata.version(name)
    assert env["container"]["image_digest"] == "sha256:" + "ab" * 32
    assert env["container"]["image"] == "ghcr.io/x/rankbias:1"
    assert env["device"]["type"] == "cpu"
    assert env["host"]["hostname"] and env["host"]["cpu_count"] >= 1
    assert env["created"].endswith("+00:00")
    json.dumps(env)  # serialisable as is


def test_absent_package_is_null(monkeypatch):
    monkeypatch.setattr(P, "PACKAGES", ("numpy", "no-such-distribution-xyz"))
    P.package_versions.cache_clear()
    try:
        v = P.package_versions()
        assert v["no-such-distribution-xyz"] is None and v["numpy"] == metadata.version("numpy")
    finally:
        P.package_versions.cache_clear()


def test_apptainer_labels_give_the_digest(tmp_path, monkeypatch):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"RANKBIAS_IMAGE_DIGEST": "sha256:" + "cd" * 32,
                                  "org.opencontainers.image.revision": "abc"}))
    monkeypatch.delenv("RANKBIAS_IMAGE_DIGEST", raising=False)
    monkeypatch.setattr(P, "APPTAINER_LABELS", labels)
    c = P.container_info()
    assert c["image_digest"] == "sha256:" + "cd" * 32 and c["image_revision"] == "abc"


def _runs(root: Path) -> list[Run]:
    for seed in (0, 1):
        path = fabricate(root / "results/runs", RunSpec(dataset="synthetic", arch="mlp", depth=2,
                                                         width=8, epochs=2, seed=seed))
        info = json.loads((path / "run.json").read_text())
        info["dataset"] = {"name": "synthetic", "checksums": {"synthetic": "0" * 32}, "source": "synthetic"}
        (path / "run.json").write_text(json.dumps(info))
    return load_runs(root / "results/runs")


def test_figure_provenance_names_runs_files_and_data(tmp_path):
    runs = _runs(tmp_path)
    rec = P.figure_provenance(runs, {"rank": {"normalise": "max", "tol": 0.01}}, "fig9", root=tmp_path)
    assert rec["figure"] == "fig9" and rec["rank"] == {"measure": "threshold", "normalise": "max", "tol": 0.01,
                                                             "conv": "kernel"}
    assert [r["run_id"] for r in rec["runs"]] == sorted(r.run_id for r in runs)
    for r, run in zip(rec["runs"], sorted(runs, key=lambda x: x.run_id)):
        assert r["path"] == f"results/runs/{run.run_id}"
        assert r["spec"] == run.spec.to_dict()
        for name, digest in r["files"].items():
            assert hashlib.sha256((run.path / name).read_bytes()).hexdigest() == digest
        assert r["run_json_sha256"] == hashlib.sha256((run.path / "run.json").read_bytes()).hexdigest()
    assert rec["datasets"] == {"synthetic": {"checksums": {"synthetic": "0" * 32}, "source": "synthetic"}}
    assert set(rec["environment"]) >= {"code", "packages", "host", "device", "container", "created"}


def _png_chunks_raw(data: bytes) -> dict:
    """PNG text chunks parsed here, independently of rankbias.store.provenance."""
    out, pos = {}, 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"zTXt":
            key, rest = body.split(b"\0", 1)
            out[key.decode()] = zlib.decompress(rest[1:]).decode()
        elif kind == b"tEXt":
            key, rest = body.split(b"\0", 1)
            out[key.decode()] = rest.decode("latin-1")
        pos += 12 + n
    return out


def test_save_figure_embeds_what_the_sidecar_holds(tmp_path):
    runs = _runs(tmp_path)
    # Characters that need escaping in a PDF string and non-ASCII text.
    rec = P.figure_provenance(runs, {"note": "a (b) \\c\n d) ( λ=5e-4 ✓"}, "fig2", root=tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = tmp_path / "results/figures/fig2.png", tmp_path / "results/figures/fig2.pdf"
    P.save_figure(fig, png, pdf, rec)
    plt.close(fig)
    sidecar = json.loads((tmp_path / "results/figures/fig2.provenance.json").read_text())
    assert sidecar == json.loads(json.dumps(rec, default=str))
    assert P.read_embedded(png) == sidecar
    assert P.read_embedded(pdf) == sidecar
    # Independent readers: Pillow's PNG text, and our own chunk walk.
    with Image.open(png) as im:
        assert json.loads(im.text[P.PNG_KEY]) == sidecar
    assert json.loads(_png_chunks_raw(png.read_bytes())[P.PNG_KEY]) == sidecar
    # The PDF info dictionary holds the record as a literal string.
    raw = pdf.read_bytes()
    assert raw.startswith(b"%PDF") and f"/{P.PDF_KEY} (".encode() in raw
    assert sidecar["config"]["note"] == "a (b) \\c\n d) ( λ=5e-4 ✓"
    assert not list(png.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_pdf_string_parser_handles_every_escape(tmp_path):
    body = (b"%PDF-1.4\n1 0 obj\n<< /Text (" + rb"a\(b\)\\ \101\n(nested)\
tail" + b") /Other <FEFF0041> >>\nendobj\n")
    assert P._pdf_text(body, "Text") == "a(b)\\ A\n(nested)tail"
    assert P._pdf_text(body, "Other") == "A"
    pdf = tmp_path / "x.pdf"
    pdf.write_bytes(b"%PDF-1.4\n<< /RankbiasProvenance ({\"k\": \"\\(\\)\"}) >>\n")
    assert P.read_embedded(pdf) == {"k": "()"}


def test_read_embedded_errors_are_clear(tmp_path):
    fig, _ = plt.subplots()
    plain = tmp_path / "plain.png"
    fig.savefig(plain)
    plt.close(fig)
    with pytest.raises(P.ProvenanceError, match="no PNG text chunk 'rankbias:provenance'"):
        P.read_embedded(plain)
    with pytest.raises(FileNotFoundError, match="no such figure"):
        P.read_embedded(tmp_path / "missing.png")
    (tmp_path / "x.svg").write_text("<svg/>")
    with pytest.raises(P.ProvenanceError, match="expected a .png or .pdf"):
        P.read_embedded(tmp_path / "x.svg")


def test_read_sidecar_errors_are_clear(tmp_path):
    png = tmp_path / "fig.png"
    side = P.sidecar_path(png)
    with pytest.raises(FileNotFoundError, match="provenance sidecar missing"):
        P.read_sidecar(png)
    side.write_text("{not json")
    with pytest.raises(P.ProvenanceError, match="not valid JSON") as e:
        P.read_sidecar(png)
    assert e.value.detail.startswith("not valid JSON (") and str(side) in str(e.value)
    side.write_text("[1, 2]")
    with pytest.raises(P.ProvenanceError, match="not a JSON object"):
        P.read_sidecar(png)
    side.write_text('{"figure": "fig"}')
    assert P.read_sidecar(png) == {"figure": "fig"}


def test_rel_path_is_posix_inside_the_root_and_absolute_outside(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "results/runs/a").mkdir(parents=True)
    monkeypatch.chdir(root)
    assert P.rel_path(Path("results/runs/a"), root) == "results/runs/a"
    assert P.rel_path(root / "results" / ".." / "results/runs/a", str(root)) == "results/runs/a"
    assert P.rel_path(root, root) == "."
    assert P.rel_path(Path("../elsewhere"), root) == str(tmp_path / "elsewhere")


# -- the code that ran ---------------------------------------------------------------

SRC = Path(P.__file__).resolve().parents[1]


def _cli(cwd: Path, pythonpath: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `rankbias` CLI in a fresh interpreter, importing the package found first
    on PYTHONPATH (as a non-editable install or an older image would)."""
    import os
    import sys
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-m", "rankbias", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_source_hash_is_over_sorted_paths_and_contents(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.py").write_text("x = 1\n")
    (a / "sub" / "y.py").write_text("y = 2\n")
    (a / "notes.txt").write_text("not code\n")
    digest, n = P.source_hash(a)
    h = hashlib.sha256()
    for rel, data in (("sub/y.py", b"y = 2\n"), ("x.py", b"x = 1\n")):
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    assert (digest, n) == (h.hexdigest(), 2)
    (a / "notes.txt").write_text("changed\n")
    assert P.source_hash(a)[0] == digest
    (a / "x.py").write_text("x = 2\n")
    assert P.source_hash(a)[0] != digest


def test_collect_records_the_imported_package(tmp_path):
    pkg = P.collect()["package"]
    assert pkg["location"] == str(SRC)
    assert pkg["sources_sha256"] == P.source_hash(SRC)[0]
    assert isinstance(pkg["git"], dict) and pkg["git"]["commit"]


def test_a_modified_package_first_on_pythonpath_is_caught(tmp_path):
    """The checkout is clean, but the figure is drawn by a modified copy of the package
    found first on PYTHONPATH: audit and `restore --check` name the figure and both hashes;
    the same figure drawn by the checkout's own sources passes."""
    import shutil
    import yaml
    repo = tmp_path / "repo"
    shutil.copytree(SRC, repo / "src" / "rankbias", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("/results/\n/.rankbias/\n__pycache__/\n")
    git(repo.parent, "init", "-q", str(repo))
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "code")
    for seed in (0, 1):
        fabricate(repo / "results/runs", RunSpec(dataset="synthetic", arch="mlp", depth=2, width=8,
                                                 epochs=2, seed=seed))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"dataset": "synthetic", "epochs": 2},
                                   "figures": {"fig2": {"model": "MLP-2-8",
                                                        "grid": {"seed": [0, 1]}}}}))
    other = tmp_path / "other"
    shutil.copytree(SRC, other / "rankbias", ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "rankbias" / "analysis" / "figures.py", "a") as f:
        f.write("\n# a change the checkout does not have\n")
    fig = "results/figures/fig2.png"

    p = _cli(repo, repo / "src", "figure", "fig2", "--config", str(cfg), "--out", fig)
    assert p.returncode == 0, p.stderr
    p = _cli(repo, repo / "src", "audit", fig)
    assert p.returncode == 0 and "audit: OK" in p.stdout, p.stdout + p.stderr
    assert _cli(repo, repo / "src", "restore", "--check").returncode == 0

    p = _cli(repo, other, "figure", "fig2", "--config", str(cfg), "--out", fig)
    assert p.returncode == 0, p.stderr
    assert git(repo, "status", "--porcelain") == ""           # the checkout is clean
    ours, theirs = P.source_hash(repo / "src" / "rankbias")[0], P.source_hash(other / "rankbias")[0]
    p = _cli(repo, repo / "src", "audit", fig)
    assert p.returncode == 1, p.stdout
    lines = [x for x in p.stdout.splitlines() if x.startswith("MISMATCH")]
    assert any(x.startswith(f"MISMATCH {fig}:") and theirs in x and ours in x
               and str(other / "rankbias") in x for x in lines), lines
    p = _cli(repo, repo / "src", "restore", "--check")
    assert p.returncode == 1, p.stdout
    assert any(x.startswith(f"FAILED {fig}:") and theirs in x and ours in x
               for x in p.stdout.splitlines()), p.stdout


def test_a_record_without_the_package_is_a_note(tmp_path):
    """Records written before the package was recorded stay readable: audit names the
    missing field in a note and checks the rest."""
    from rankbias.verify import audit as A
    root = tmp_path
    fabricate(root / "results/runs", RunSpec(dataset="synthetic", arch="mlp", depth=2, width=8, epochs=2))
    record = P.figure_provenance(load_runs(root / "results/runs"), {}, "fig2", root=root)
    del record["environment"]["package"]
    fig, ax = plt.subplots()
    P.save_figure(fig, root / "results/figures/fig2.png", root / "results/figures/fig2.pdf", record)
    plt.close(fig)
    a = A.Audit(root / "results/figures/fig2.png", root)
    a.package(a.record())
    assert a.problems == []
    assert any("not recorded" in n and "results/figures/fig2.png" in n for n in a.notes), a.notes
