"""scripts/gpu_check.py on the CPU: the pack shapes it times, the GPU-hour arithmetic
from given timings, the timings file `rankbias.plan.cluster` reads back, and a whole run of
its timing part (the CUDA parts need a GPU)."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from rankbias.plan import cluster, sweep
from rankbias.core.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _one_pack_plan(**defaults):
    return sweep.plan({"defaults": {"dataset": "synthetic", "train_subset": 0, "epochs": 4, "log_every": 2,
                                    "batch_size": 64, "seeds": [0], **defaults},
                       "figures": {"fig1": {"model": "MLP-2-16", "grid": {"weight_decay": [0.0, 1e-3]}}}})


def test_paper_shapes_group_packs_that_differ_only_per_member():
    plan = sweep.plan_from_file(ROOT / "config" / "paper.yaml")
    shapes = gpu_check.shapes_of({"paper": plan})
    assert sum(len(v) for v in shapes.values()) == len(plan.packs)
    for packs in shapes.values():
        keys = {(s[0].model, s[0].dataset, max(x.batch_size for x in s), len(s), s[0].sizes()) for _, s in packs}
        assert len(keys) == 1
    # a learning rate or a seed changes no time; B, K, precision and the model do
    specs = plan.pack_specs(next(iter(plan.packs)))
    key = cluster.shape_key(specs)
    assert cluster.shape_key([dataclasses.replace(s, lr=s.lr / 2, seed=s.seed + 1) for s in specs]) == key
    for change in ({"batch_size": 7}, {"precision": "tf32"}, {"width": specs[0].width + 1}):
        assert cluster.shape_key([dataclasses.replace(s, **change) for s in specs]) != key
    assert cluster.shape_key(specs[:1]) != key or len(specs) == 1


def test_gpu_hours_by_hand_from_given_timings():
    plan = _one_pack_plan()
    (pid,) = plan.packs
    specs = plan.pack_specs(pid)
    n = specs[0].sizes()[0]
    steps = 4 * -(-n // 64)
    timings = {cluster.shape_key(specs): cluster.ShapeTiming(step_s=0.5, logged_epoch_s=2.0, setup_s=3.0)}
    # start-up, set-up, every step, and 3 logged epochs (0, 2, 4)
    want = cluster.COST_MODELS["cuda"].startup_seconds + 3.0 + steps * 0.5 + 3 * 2.0
    assert cluster.estimate_seconds(specs, "cuda", timings) == pytest.approx(want)
    assert gpu_check.profile_hours({"p": plan}, timings)["p"] == pytest.approx(want / 3600)
    # the job's time limit follows: twice the estimate, in whole minutes
    assert cluster.estimate_runtime_minutes(specs, "cuda", timings) == max(
        cluster.MIN_MINUTES, -(-2 * want // 60))
    # a shape the timings lack, and the CPU, keep the cost model
    other = _one_pack_plan(batch_size=32)
    o_specs = other.pack_specs(next(iter(other.packs)))
    assert cluster.estimate_seconds(o_specs, "cuda", timings) == cluster.model_seconds(o_specs, "cuda")
    assert cluster.estimate_seconds(specs, "cpu", timings) == cluster.model_seconds(specs, "cpu")
    # a logged epoch the budget left unmeasured: the cost model's stands in for it alone
    part = {cluster.shape_key(specs): cluster.ShapeTiming(step_s=0.5, logged_epoch_s=None, setup_s=3.0)}
    assert cluster.estimate_seconds(specs, "cuda", part) == pytest.approx(
        want - 3 * 2.0 + 3 * cluster.model_logged_epoch_seconds(specs, "cuda"))


def test_timings_file_round_trip_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cluster.ENV_TIMINGS, raising=False)
    assert cluster.load_timings() == {}              # no file: the cost model
    f = tmp_path / "t.json"
    with pytest.raises(SpecError, match="t.json does not exist"):
        cluster.load_timings(f)
    f.write_text("{not json")
    with pytest.raises(SpecError, match=r"timings file .*t\.json: unreadable"):
        cluster.load_timings(f)
    f.write_text(json.dumps({"format": cluster.TIMINGS_FORMAT,
                             "shapes": [{"key": "k", "step_s": -1, "logged_epoch_s": 1}]}))
    with pytest.raises(SpecError, match="finite and >= 0"):
        cluster.load_timings(f)
    f.write_text(json.dumps({"format": "something else", "shapes": []}))
    with pytest.raises(SpecError, match="format"):
        cluster.load_timings(f)
    f.write_text(json.dumps({"format": cluster.TIMINGS_FORMAT,
                             "shapes": [{"key": "k", "step_s": 0.25, "logged_epoch_s": 1, "setup_s": 2}]}))
    monkeypatch.setenv(cluster.ENV_TIMINGS, str(f))
    assert cluster.load_timings() == {"k": cluster.ShapeTiming(0.25, 1.0, 2.0)}


def test_timing_run_on_the_cpu_writes_what_the_estimates_read(tmp_path, capsys):
    out = tmp_path / "timings.json"
    config = str(ROOT / ".test" / "config.yaml")
    rc = gpu_check.main(["--device", "cpu", "--config", config, "--skip", "tests", "bench",
                         "--min-steps", "2", "--timings-out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "gpu-check:" in text and text.rstrip().endswith("ok")
    plan = sweep.plan_from_file(config)
    shapes = gpu_check.shapes_of({config: plan})
    assert f"profile {config}: {len(plan.packs)} packs" in text
    assert "CPU-hours (" in text and "GPU-hours (" not in text      # the device timed, named
    n = len(shapes)
    assert f"({n} of {n} shapes' steps and {n} logged epochs measured" in text
    doc = json.loads(out.read_text())
    assert {r["key"] for r in doc["shapes"]} == set(shapes)
    for r in doc["shapes"]:
        assert r["steps_timed"] == 2 and r["step_s"] > 0 and r["logged_epoch_s"] > 0
        parts = ("evaluation_s", "weight_spectra_s", "operator_spectra_s", "theorem1_s")
        assert sum(r[p] for p in parts) == pytest.approx(r["logged_epoch_s"], rel=1e-3)
        assert r["evaluation_s"] > 0 and r["theorem1_s"] > 0
        if r["key"].startswith("CONV"):       # a convolution's operator spectrum, timed apart
            assert r["operator_spectra_s"] > 1e-4
    timings = cluster.load_timings(out)
    assert set(timings) == set(shapes)
    # the printed total is the estimates' own sum, from the file just written
    total = sum(cluster.estimate_seconds(plan.pack_specs(p), "cpu", timings) for p in plan.packs) / 3600
    assert doc["profile_hours"][config] == pytest.approx(total, rel=1e-3)


def test_a_spent_budget_leaves_shapes_to_the_cost_model(tmp_path, capsys):
    config = str(ROOT / ".test" / "config.yaml")
    rc = gpu_check.main(["--device", "cpu", "--config", config, "--skip", "tests", "bench",
                         "--budget", "0", "--timings-out", str(tmp_path / "t.json")])
    text = capsys.readouterr().out
    assert rc == 0 and "(0 of" in text and "cost model" in text
    assert json.loads((tmp_path / "t.json").read_text())["shapes"] == []
