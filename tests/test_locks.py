"""The locks carry a sha256 for every package, `make install` checks them
(pip install --require-hashes), and scripts/hash_locks.py, which `make lock` uses to
write them, keeps every pin and refuses a changed one."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

LOCKS = ("requirements.lock", "requirements-test.lock")
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?: --hash=sha256:[0-9a-f]{64})+)$")


def entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)}; every entry must be a hashed exact pin."""
    out = {}
    for line in re.sub(r"[ \t]*\\\n[ \t]*", " ", text).splitlines():
        if not line or line.startswith("#"):
            continue
        m = ENTRY.match(line)
        assert m, f"not NAME==VERSION with its --hash=sha256 options: {line[:120]!r}"
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), m.group(3).split())
    return out


@pytest.mark.parametrize("lock", LOCKS)
def test_every_package_in_the_locks_has_a_sha256(lock):
    pins = entries((ROOT / lock).read_text())
    assert len(pins) > 10
    for name, (_, hashes) in pins.items():
        assert hashes and len(set(hashes)) == len(hashes), name


def test_the_locks_are_disjoint_and_pin_the_direct_dependencies():
    runtime, test = (entries((ROOT / f).read_text()) for f in LOCKS)
    assert not set(runtime) & set(test)
    assert runtime["torch"][0] == "2.14.1" and runtime["torchvision"][0] == "0.29.1"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["workflow"]:
        assert re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ]", dep)[0]).lower() in runtime, dep
    for dep in project["optional-dependencies"]["test"]:
        assert re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ]", dep)[0]).lower() in test, dep


def test_make_install_requires_the_hashes():
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^\$\(STAMP\):.*?^$", makefile, re.M | re.S).group(0)
    install = next(x for x in block.splitlines() if "-r requirements.lock" in x)
    assert "--require-hashes" in install and "-r requirements-test.lock" in install
    assert "--generate-hashes" in makefile and "scripts/hash_locks.py" in makefile


def _hash_locks(tmp_path, compiled: str, runtime: str, test: str) -> subprocess.CompletedProcess:
    for name, text in (("all.txt", compiled), ("runtime.txt", runtime), ("test.txt", test)):
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "hash_locks.py"), "all.txt", "runtime.txt",
                           "test.txt"], cwd=tmp_path, capture_output=True, text=True)


def test_hash_locks_splits_the_compiled_file_and_refuses_a_changed_pin(tmp_path):
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    compiled = (f"numpy==2.4.6 \\\n    --hash=sha256:{a} \\\n    --hash=sha256:{b}\n"
                f"pytest==9.2.0 \\\n    --hash=sha256:{c}\n")
    p = _hash_locks(tmp_path, compiled, "numpy==2.4.6\n", "pytest==9.2.0\n")
    assert p.returncode == 0, p.stderr
    runtime = entries((tmp_path / "requirements.lock").read_text())
    test = entries((tmp_path / "requirements-test.lock").read_text())
    assert runtime == {"numpy": ("2.4.6", [f"--hash=sha256:{a}", f"--hash=sha256:{b}"])}
    assert test == {"pytest": ("9.2.0", [f"--hash=sha256:{c}"])}
    p = _hash_locks(tmp_path, compiled.replace("2.4.6", "2.4.7"), "numpy==2.4.6\n", "pytest==9.2.0\n")
    assert p.returncode != 0 and "differ" in p.stderr
    p = _hash_locks(tmp_path, "numpy==2.4.6\npytest==9.2.0\n", "numpy==2.4.6\n", "pytest==9.2.0\n")
    assert p.returncode != 0 and "no sha256" in p.stderr
