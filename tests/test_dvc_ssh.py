"""DVC with an SSH remote, as on a real server: an OpenSSH server of this test's own on
127.0.0.1 (its own host key, port and authorized key), the dvc-ssh plugin, a push from
one clone, a pull into a second, `rankbias restore`, and a dry run that plans nothing."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TEST_CONFIG, copy_repo, planned_jobs
from test_dvc import sh, use_config

pytestmark = pytest.mark.slow
SSHD = Path("/usr/sbin/sshd")


def _missing() -> str | None:
    if not SSHD.exists() or not shutil.which("ssh-keygen"):
        return "OpenSSH is not installed (Debian packages openssh-server and openssh-client; .ci/run installs them)"
    if os.geteuid() != 0:
        return "sshd runs as root here (privilege separation needs it)"
    try:
        import dvc_ssh  # noqa: F401
    except ImportError:
        return "the dvc-ssh plugin is not installed (requirements.lock)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """(port, client key, HOME whose known_hosts trusts the server); stopped afterwards."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {proc.stdout.read() if proc.stdout else ''}")
                time.sleep(0.2)
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        yield port, d / "client_key", home
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_push_to_an_ssh_remote_and_pull_into_a_fresh_clone(sshd, tiny_pipeline, tmp_path, monkeypatch):
    port, key, home = sshd
    monkeypatch.setenv("HOME", str(home))  # known_hosts for the dvc-ssh client
    outside, _ = tiny_pipeline
    repo = copy_repo(tmp_path / "repo")
    for d in ("results", "data"):
        shutil.copytree(outside / d, repo / d, symlinks=True)
    use_config(repo, TEST_CONFIG)
    remote = tmp_path / "remote"
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "server", f"ssh://root@127.0.0.1:{port}{remote}")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "code")
    sh(repo, "dvc", "commit", "-f")
    sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "results")
    # The key is each user's own: in .dvc/config.local, which git does not carry.
    sh(repo, "dvc", "remote", "modify", "--local", "server", "keyfile", str(key))
    sh(repo, "dvc", "push")
    assert (remote / "files" / "md5").is_dir()

    sh(tmp_path, "git", "clone", "-q", "repo", "clone")
    clone = tmp_path / "clone"
    assert not (clone / "results").exists()
    sh(clone, "dvc", "remote", "modify", "--local", "server", "keyfile", str(key))
    sh(clone, "dvc", "pull")
    p = sh(clone, "rankbias", "restore", "--", "--configfile", TEST_CONFIG)
    assert "0 problem(s)" in p.stdout, p.stdout
    p = sh(clone, "snakemake", "-n", "--configfile", TEST_CONFIG, "--cores", "1")
    assert planned_jobs(p.stdout + p.stderr) == {}, p.stdout[-3000:]
