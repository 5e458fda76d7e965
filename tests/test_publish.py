"""The published results cache, end to end: `rankbias publish` writes the DVC cache as
static files, Python's http.server serves them on 127.0.0.1, and a fresh clone pulls
them over HTTP with no credentials (the default `public` remote), restores and audits
them; then Snakemake plans nothing."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import time

import pytest
from test_dvc import FIGS, STAGES, build_pushed, clone, dry_run, restore, sh

from rankbias.verify import dvcstate, publish

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A repository whose tiny pipeline's figures were committed to DVC and pushed to the
    maintainer's remote (tests/test_dvc.py)."""
    return build_pushed(tmp_path_factory.mktemp("publish"))


@pytest.fixture(scope="module")
def served(pushed):
    """(published folder, its http:// address), served by http.server while the tests run."""
    repo = pushed / "repo"
    p = sh(repo, "rankbias", "publish", "--archive", "dist/results-cache.tar.gz")
    assert "publish:" in p.stdout and "archive:" in p.stdout, p.stdout
    folder = repo / "dist" / "results-cache"
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               "--directory", str(folder), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("http.server did not start")
                time.sleep(0.2)
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_published_folder_is_the_pushed_cache_with_manifest_and_checksums(pushed, served):
    folder, _ = served
    repo = pushed / "repo"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema"] == publish.SCHEMA
    assert manifest["commit"] == sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert (folder / "dvc.lock").read_bytes() == (repo / "dvc.lock").read_bytes()
    # Exactly the objects `dvc push` sent to the maintainer's remote, in the same layout.
    remote = pushed / "rankbias-dvc-remote"
    pushed_objects = {p.relative_to(remote).as_posix() for p in (remote / "files").rglob("*") if p.is_file()}
    published = {p.relative_to(folder).as_posix() for p in (folder / "files").rglob("*") if p.is_file()}
    assert published == pushed_objects == {o["path"] for o in manifest["objects"]}
    for o in manifest["objects"]:
        f = folder / o["path"]
        assert dvcstate.md5_file(f) == o["md5"].removesuffix(".dir") and f.stat().st_size == o["size"]
        assert o["outputs"], o
    figure_outputs = {out for o in manifest["objects"] for out in o["outputs"]}
    assert {f"results/figures/{f}.png" for f in FIGS} <= figure_outputs
    # SHA256SUMS covers every other file, in `sha256sum -c` form.
    p = sh(folder, "sha256sum", "--strict", "-c", "SHA256SUMS")
    assert p.stdout.count(": OK") == len(published) + 2, p.stdout   # objects, manifest, dvc.lock
    # The archive unpacks to the same folder, and is the same bytes when written again.
    with tarfile.open(repo / "dist/results-cache.tar.gz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {f"results-cache/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*") if p.is_file()}
    # Publishing the same commit again writes the same bytes (folder and archive).
    sums, first = (folder / "SHA256SUMS").read_bytes(), (repo / "dist/results-cache.tar.gz").read_bytes()
    sh(repo, "rankbias", "publish", "--archive", "dist/results-cache.tar.gz")
    assert (folder / "SHA256SUMS").read_bytes() == sums
    assert (repo / "dist/results-cache.tar.gz").read_bytes() == first


def test_anonymous_http_pull_restores_audits_and_plans_nothing(pushed, served, tmp_path):
    _, url = served
    repo = pushed / "repo"
    # The maintainer records where the folder is served, in the committed .dvc/config.
    sh(repo, "dvc", "remote", "modify", "public", "url", url)
    sh(repo, "git", "add", ".dvc/config")
    sh(repo, "git", "commit", "-qm", "results served over HTTP")
    try:
        home = tmp_path / "home"   # no credentials, no user or global DVC config
        home.mkdir()
        dest = clone(pushed, "clone_http", pull=False)
        env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
        assert not (dest / ".dvc/config.local").exists()
        remotes = sh(dest, "dvc", "remote", "list", env=env).stdout
        assert url in remotes, remotes
        sh(dest, "dvc", "pull", *STAGES, env=env)   # the default remote: `public`, over HTTP
        assert not (dest / ".dvc/config.local").exists()
        p = restore(dest)
        assert "0 problem(s)" in p.stdout, p.stdout
        for fig in FIGS:
            p = sh(dest, "rankbias", "audit", f"results/figures/{fig}.png")
            assert "audit: OK" in p.stdout, p.stdout
        assert dry_run(dest) == {}
    finally:
        sh(repo, "git", "reset", "-q", "--hard", "HEAD~1")


def test_publish_refuses_an_uncommitted_lock_and_a_corrupt_object(pushed, tmp_path):
    repo = clone(pushed, "clone_publish")   # pulled from the maintainer's remote
    lock = repo / "dvc.lock"
    text = lock.read_text()
    lock.write_text(text + "\n")
    p = sh(repo, "rankbias", "publish", check=False)
    assert p.returncode == 1 and "dvc.lock differs from the commit" in p.stderr, p.stderr
    lock.write_text(text)
    prov = json.loads((repo / "results/figures/fig1.provenance.json").read_text())
    f = repo / "results/runs" / prov["runs"][0]["run_id"] / "metrics.parquet"
    obj = dvcstate.cache_object(repo, dvcstate.md5_file(f))
    obj.chmod(0o644)
    obj.write_bytes(b"corrupt" + obj.read_bytes())
    p = sh(repo, "rankbias", "publish", "--out", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and "corrupt" in p.stderr and str(obj) in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
    # A folder that is not an earlier publish is never replaced.
    (tmp_path / "mine").mkdir()
    p = sh(repo, "rankbias", "publish", "--out", str(tmp_path / "mine"), check=False)
    assert p.returncode == 1 and "not a folder" in p.stderr, p.stderr
