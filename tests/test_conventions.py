"""The files the ecosystem's tools and catalogs read: the workflow catalog's usage file and
the package's metadata as `pip wheel` builds it (SPDX licence, one version, no deprecation warning)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import rankbias

ROOT = Path(__file__).resolve().parents[1]


def test_workflow_catalog_usage_file():
    usage = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment", "report"}
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    stack = usage["software-stack-deployment"]
    assert stack["apptainer"] is True and stack["conda"] is False
    assert usage["report"] is True and "report:" in (ROOT / "Snakefile").read_text()


@pytest.mark.slow
def test_wheel_builds_without_deprecation_and_carries_the_metadata(tmp_path):
    """An isolated `pip wheel .` (the build backend fetched as pyproject.toml asks)."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "Deprecat" not in log, "\n".join(l for l in log.splitlines() if "eprecat" in l)
    (wheel,) = tmp_path.glob("rankbias-*.whl")
    with zipfile.ZipFile(wheel) as z:
        info = f"rankbias-{rankbias.__version__}.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert f"\nVersion: {rankbias.__version__}\n" in meta
    assert "\nLicense-Expression: MIT\n" in meta and "\nLicense-File: LICENSE\n" in meta
    assert "Classifier: Programming Language :: Python :: 3" in meta and "Project-URL: " in meta


def test_version_and_help():
    cli = [sys.executable, "-m", "rankbias"]
    p = subprocess.run([*cli, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"rankbias {rankbias.__version__}"
    p = subprocess.run([*cli, "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    assert "SGD and weight decay secretly minimise the rank" in p.stdout and "snakemake" in p.stdout
