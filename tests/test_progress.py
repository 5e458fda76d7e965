"""Progress on the terminal: a pack's rate-limited lines and heartbeat, the whole run's
estimate from the cost model corrected as packs finish, and the workflow's commands
(the plan job's is short; the training job's sends progress to the terminal)."""
from __future__ import annotations

import io
import json
import os
import re

import pytest
from conftest import TEST_CONFIG, copy_repo, snakemake

from rankbias.plan import progress as G
from rankbias.cli import main

LINE = re.compile(r"^\[pack abc\] epoch (\d+)/20 loss (\d\.\d{4}|-) mean rank (\d+\.\d|-) ETA (\S+)")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_epoch_lines_are_rate_limited_first_and_last_always():
    out, clock = io.StringIO(), Clock()
    p = G.PackProgress(out, "abc", 20, min_interval=10, max_silence=25, clock=clock)
    printed = []
    for epoch in range(1, 21):       # an epoch every 3 s
        clock.t = 3.0 * epoch
        printed.append(p.epoch(epoch, 0.5 / epoch, 30.0 - epoch, 3.0 * (20 - epoch)))
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(x).group(1)) for x in lines] == [1, 5, 9, 13, 17, 20]
    assert sum(printed) == len(lines)
    assert lines[0] == "[pack abc] epoch 1/20 loss 0.5000 mean rank 29.0 ETA 57s"
    assert lines[-1].endswith("ETA 0s")
    times = [3.0 * int(LINE.match(x).group(1)) for x in lines]
    assert all(b - a >= 10 for a, b in zip(times, times[1:-1]))


def test_heartbeat_repeats_the_latest_state_when_an_epoch_is_long():
    out, clock = io.StringIO(), Clock()
    p = G.PackProgress(out, "abc", 20, min_interval=10, max_silence=25, clock=clock)
    assert not p.beat()                 # nothing said yet: nothing to repeat
    clock.t = 60.0
    p.say("[pack abc] K=4 MLP-5-100 on mnist, cpu: 20 epochs")
    clock.t = 84.0
    assert not p.beat()
    clock.t = 85.0
    assert p.beat()                     # the first epoch is long: heard from all the same
    assert out.getvalue().splitlines()[-1] == "[pack abc] epoch 1/20 running for 25s"
    clock.t = 100.0
    p.epoch(1, 2.3, None, 950.0)
    clock.t = 124.0
    assert not p.beat()
    clock.t = 125.0
    assert p.beat()
    last = out.getvalue().splitlines()[-1]
    assert LINE.match(last) and "mean rank -" in last
    assert last.endswith("ETA 15m25s (epoch 2 running for 25s)")
    clock.t = 140.0
    assert not p.beat()                 # 15 s since the heartbeat
    clock.t = 150.0
    assert p.beat()


def test_heartbeat_names_what_runs_before_the_first_epoch():
    """A wide pack's epoch 0 (evaluation, spectra, lemma checks) takes minutes on a CPU:
    the heartbeat says so, and the first epoch's clock starts when it is done."""
    out, clock = io.StringIO(), Clock()
    p = G.PackProgress(out, "abc", 20, min_interval=10, max_silence=25, clock=clock)
    p.say("[pack abc] K=12 RES-5-500 on mnist, cpu: 20 epochs")
    with p.during("epoch 0 (the fresh network)"):
        clock.t = 30.0
        assert p.beat()
        assert out.getvalue().splitlines()[-1] == "[pack abc] epoch 0 (the fresh network) running for 30s"
        clock.t = 300.0
        assert p.beat()
        assert out.getvalue().splitlines()[-1] == "[pack abc] epoch 0 (the fresh network) running for 5m00s"
    clock.t = 330.0
    assert p.beat()
    assert out.getvalue().splitlines()[-1] == "[pack abc] epoch 1/20 running for 30s"


def test_heartbeat_thread_keeps_a_slow_pack_heard_from():
    out = io.StringIO()
    p = G.PackProgress(out, "abc", 20, min_interval=0.02, max_silence=0.05).start()
    try:
        p.epoch(1, 1.0, 5.0, 60.0)
        import time
        time.sleep(0.4)
    finally:
        p.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(LINE.match(x) for x in lines)
    assert "running for" in lines[-1]


def test_a_closed_terminal_does_not_stop_training():
    out = io.StringIO()
    p = G.PackProgress(out, "abc", 20)
    out.close()
    assert p.epoch(1, 1.0, 5.0, 60.0)     # written nowhere, no error


def test_duration():
    assert [G.duration(s) for s in (0, 44.6, 60, 185, 3600 * 2 + 240)] == ["0s", "45s", "1m00s", "3m05s", "2h04m"]


def test_whole_run_estimate_is_corrected_as_packs_finish(tmp_path):
    runs = tmp_path / "runs"
    done = runs / "r0"
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"wall_time_s": 5.0}))
    plan = G.run_plan({"p0": (["q", "r0"], 99.0), "p1": (["a", "b"], 20.0), "p2": (["c"], 40.0),
                       "p3": (["d"], 60.0)}, slots=2, runs_dir=runs)
    assert sorted(plan["packs"]) == ["p1", "p2", "p3"]    # p0 was trained before this run
    assert G.start_line(plan).startswith("[run] 3 pack(s) to train: about 1m00s with 2 at a time "
                                         "(cost model: 2m00s of training;")
    assert G.finished_line(plan, now=plan["started"] + 5).endswith(
        "0/3 pack(s) trained, 5s so far; 3 pack(s) left, about 1m00s by the cost model")
    for run_id in ("b", "c"):
        (runs / run_id).mkdir()
        (runs / run_id / "run.json").write_text("{}")
    line = G.finished_line(plan, now=plan["started"] + 30)
    # 60 s of the cost model done in 30 s: its 60 s left are about 30 s
    assert line == ("[run] 2/3 pack(s) trained, 30s so far; about 30s of training left (1 pack(s): "
                    "the cost model's 1m00s at this run's pace, x 0.50)")
    (runs / "d").mkdir()
    (runs / "d" / "run.json").write_text("{}")
    assert G.finished_line(plan, now=plan["started"] + 70).endswith("1m10s so far; training done")
    assert G.start_line(G.run_plan({"p0": (["q", "r0"], 9.0)}, 1, runs)) is None


def test_train_names_a_progress_fd_that_is_not_open(tmp_path, capsys):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps([{"dataset": "synthetic", "model": "MLP-2-8", "epochs": 1}]))
    assert main(["train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--progress-fd", str(fd)]) == 1
    err = capsys.readouterr().err
    assert f"--progress-fd {fd}: not an open file descriptor" in err
    assert not (tmp_path / "runs").exists()


def test_plan_reads_its_config_from_the_environment_and_checks_it(tmp_path, monkeypatch, capsys):
    from rankbias.plan import sweep
    cfg = sweep.load_config(TEST_CONFIG)
    p = sweep.plan(cfg)
    digest = sweep.config_digest(sweep.job_configs(p)[None])
    monkeypatch.setenv("PLANNED", json.dumps(p.config))
    args = ["plan", "--config-env", "PLANNED", "--write-configs", str(tmp_path / "c"),
            "--write-packs", str(tmp_path / "p")]
    assert main([*args, "--expect-config", "0" * 12]) == 1
    err = capsys.readouterr().err
    assert f"plans the job config {digest}, expected 000000000000" in err and "nothing written" in err
    assert not (tmp_path / "c").exists()
    assert main([*args, "--expect-config", digest]) == 0
    assert (tmp_path / "c" / f"{digest}.json").is_file()
    assert sorted(x.stem for x in (tmp_path / "p").iterdir()) == sorted(p.packs)
    monkeypatch.delenv("PLANNED")
    assert main(args) == 1
    assert "--config-env PLANNED: the environment variable is not set" in capsys.readouterr().err


def test_the_run_plan_file_is_read_back_and_its_absence_is_no_error(tmp_path):
    plan = G.run_plan({"abc": (["r1", "r2"], 3.0)}, 2, tmp_path / "runs")
    G.write_plan(plan, tmp_path / "logs" / "run-plan.json")
    assert G.read_plan(tmp_path / "logs" / "run-plan.json") == json.loads(json.dumps(plan))
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["run-plan.json"]   # no temporary left
    assert G.read_plan(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert G.read_plan(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert G.read_plan(tmp_path / "list.json") is None


@pytest.mark.slow
def test_the_workflow_prints_a_short_plan_command_and_sends_training_progress_to_the_terminal(tmp_path):
    wd = copy_repo(tmp_path / "repo")
    p = snakemake(wd, "-n", "--printshellcmds", "--configfile", TEST_CONFIG)
    out = p.stdout + p.stderr
    shell = [line.split("Shell command:", 1)[-1].strip() for line in out.splitlines()]
    plan = [line for line in shell if line.startswith("rankbias plan ")]
    assert plan and all(len(line) < 250 for line in plan), plan
    train = [line for line in shell if " rankbias train " in line]
    assert train and all("--progress-fd 3 3>&2 > results/logs/train/" in line for line in train), train


def test_train_sends_rate_limited_lines_and_the_run_estimate_to_the_progress_fd(tmp_path):
    """The training job as the workflow runs it: every epoch in the log (stderr), the
    terminal's lines on fd 3, and the whole run's line when the pack is done."""
    import subprocess
    import sys

    from rankbias.core.pack import load_pack, pack_id
    specs = [{"dataset": "synthetic", "model": "MLP-2-8", "epochs": 3, "batch_size": 64, "seed": s}
             for s in (0, 1)]
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps(specs))
    members = load_pack(pack)
    pid, run_ids = pack_id(members), [m.run_id for m in members]
    runs = tmp_path / "runs"
    plan = G.run_plan({pid: (run_ids, 4.0), "other": (["x"], 8.0)}, 1, runs)
    G.write_plan(plan, tmp_path / "logs" / "run-plan.json")
    read, write = os.pipe()
    p = subprocess.run([sys.executable, "-m", "rankbias", "train", str(pack), "--out", str(runs),
                        "--device", "cpu", "--progress-fd", str(write),
                        "--run-plan", str(tmp_path / "logs" / "run-plan.json")], pass_fds=(write,),
                       capture_output=True, text=True, timeout=300)
    os.close(write)
    with os.fdopen(read) as f:
        shown = f.read().splitlines()
    assert p.returncode == 0, p.stderr
    assert f"[pack {pid}] epoch 3/3 loss" in p.stderr             # the log keeps every line
    assert shown[0].startswith(f"[pack {pid}] K=2 MLP-2-8 on synthetic, cpu: 3 epochs")
    epochs = [x for x in shown if " epoch " in x and "ETA" in x]
    assert epochs[0].startswith(f"[pack {pid}] epoch 1/3 loss ") and epochs[-1].endswith("ETA 0s")
    assert re.match(rf"\[pack {pid}\] done: 2 runs, \S+ of training, \S+ in this job$", shown[-2])
    assert shown[-1].startswith("[run] 1/2 pack(s) trained, ") and "at this run's pace" in shown[-1]
