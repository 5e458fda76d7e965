"""The layer check of `make lint` (scripts/check_layers.py): clean on the package, and
failing on each kind of breach in a package built for the purpose."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def test_the_package_keeps_its_layers():
    assert check_layers.check(ROOT / "src" / "rankbias") == []


@pytest.fixture
def package(tmp_path):
    src = tmp_path / "src" / "rankbias"
    shutil.copytree(ROOT / "src" / "rankbias", src, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _add(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


@pytest.mark.parametrize("module, line, expected", [
    ("store/results.py", "from rankbias.train import engine", "store) imports rankbias.train.engine (train)"),
    ("analysis/claims.py", "from rankbias.train.models import build_net", "analysis) imports rankbias.train.models"),
    ("core/spec.py", "from rankbias.plan.sweep import plan", "core) imports rankbias.plan.sweep (plan)"),
    ("plan/cluster.py", "import torch", "imports torch; the plan layer never imports torch"),
    ("core/io.py", "def f():\n    import torchvision", "imports torchvision; the core layer"),
    ("train/engine.py", "from rankbias.train.loop import _theory", "private name _theory"),
])
def test_each_breach_is_named(package, module, line, expected):
    _add(package / module, line)
    problems = check_layers.check(package)
    assert any(expected in p for p in problems), problems
    assert check_layers.main([str(package)]) == 1


def test_a_cycle_through_a_late_import_is_found(package):
    _add(package / "train" / "models.py", "def f():\n    from rankbias.train import engine")
    problems = check_layers.check(package)
    assert any(p.startswith("import cycle:") and "rankbias.train.engine" in p and "rankbias.train.models" in p
               for p in problems), problems
