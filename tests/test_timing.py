"""Per-job timing records (rankbias.core.timing) and their summary."""
import json
import subprocess
import sys

from rankbias.core import timing


def test_a_command_appends_its_timing_line(tmp_path):
    log = tmp_path / "timing.jsonl"
    env = {"RANKBIAS_TIMING": str(log), "PATH": "/usr/bin:/bin"}
    import os
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "rankbias.cli", "plan", "--config", ".test/config.yaml"],
                       check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["command"] for r in rows] == ["plan", "plan"]
    assert all(r["rc"] == 0 and r["run_s"] >= 0 and r["startup_s"] > 0 for r in rows)


def test_summary_adds_up_per_command():
    rows = [{"command": "train", "target": "a", "end": 10.0, "startup_s": 2.0, "run_s": 30.0, "rc": 0,
             "phases": {"train_steps": 25.0, "spectra_eval": 4.0}},
            {"command": "train", "target": "b", "end": 20.0, "startup_s": 3.0, "run_s": 10.0, "rc": 0,
             "phases": {"train_steps": 8.0, "spectra_eval": 1.0}},
            {"command": "figure", "target": "fig1", "end": 30.0, "startup_s": 4.0, "run_s": 1.0, "rc": 0,
             "phases": {}}]
    text = timing.summarise(rows, wall_s=40.0, cores=2)
    train = next(line for line in text.splitlines() if line.startswith("train"))
    assert train.split()[1:4] == ["2", "5.0", "40.0"]
    assert "spectra_eval 5.0" in train and "train_steps 33.0" in train
    assert "total 50.0 core-s" in text
    assert "80.0 core-s" in text and ": 30.0 core-s" in text   # 2 x 40 - 50 outside the jobs


def test_read_keeps_the_jobs_since(tmp_path):
    log = tmp_path / "t.jsonl"
    log.write_text("\n".join(json.dumps({"command": "x", "end": e, "startup_s": 1, "run_s": 1,
                                         "rc": 0, "phases": {}}) for e in (5, 15)) + "\n")
    assert [r["end"] for r in timing.read(log, since=10)] == [15]
