"""scripts/gpu_check.py on the CPU: which pack it times, its GPU-hour arithmetic, and a
whole run of its epoch timing (the CUDA parts need a GPU)."""
import importlib.util
import json
from pathlib import Path

import pytest

from rankbias import sweep

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_the_slowest_paper_pack_is_a_b4_cifar_pack():
    plan = sweep.plan_from_file(ROOT / "config" / "paper.yaml")
    specs = plan.pack_specs(gpu_check.slowest_pack(plan))
    assert specs[0].dataset == "cifar10" and min(s.batch_size for s in specs) == 4
    assert plan.steps(gpu_check.slowest_pack(plan)) == max(plan.steps(p) for p in plan.packs)


def test_gpu_hours_by_hand_for_a_one_pack_plan():
    plan = sweep.plan({"defaults": {"dataset": "synthetic", "train_subset": 0, "epochs": 4, "log_every": 2,
                                    "batch_size": 64, "seeds": [0]},
                       "figures": {"fig1": {"model": "MLP-2-16", "grid": {"weight_decay": [0.0, 1e-3]}}}})
    (pid,) = plan.packs
    specs = plan.pack_specs(pid)
    n = specs[0].sizes()[0]
    steps = 4 * (n // 64)
    hours = gpu_check.estimate_gpu_hours(plan, specs, step_s=0.5, record_s=2.0)
    # the timed pack itself: its steps at the measured step, 3 logged epochs (0, 2, 4)
    assert hours == pytest.approx((steps * 0.5 + 3 * 2.0) / 3600)


def test_epoch_timing_runs_on_the_cpu(capsys):
    rc = gpu_check.main(["--device", "cpu", "--config", str(ROOT / ".test" / "config.yaml"),
                         "--skip", "tests", "bench", "--max-steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "gpu-check: ok" in out
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert report["steps"] == 2 and report["step_s"] > 0 and report["paper_profile_gpu_hours"] > 0
