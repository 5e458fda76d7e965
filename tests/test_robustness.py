"""What survives a kill, a signal, a second job, a full disk and a bad file: training
and the run files, tried with real processes, real signals and crafted files."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rankbias.analysis import claims, figures
from rankbias.train import loop as T
from rankbias.store.results import Run, RunError, write_run
from rankbias.core.io import atomic_write_bytes
from rankbias.core.pack import pack_id
from rankbias.core.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]


def spec(epochs=4, seed=0, lr=0.05, width=16, **kw):
    return RunSpec(dataset="synthetic", arch="mlp", depth=2, width=width, batch_size=64, lr=lr,
                   epochs=epochs, seed=seed, **kw)


def outputs(run_dir: Path):
    """A run's trajectory: metrics, layers and spectra (not wall time or provenance)."""
    run = Run(run_dir)
    return run.metrics, run.layers, run.spectra


def assert_same_trajectory(a: Path, b: Path) -> None:
    ma, la, sa = outputs(a)
    mb, lb, sb = outputs(b)
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(la, lb)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


class Killed(Exception):
    pass


def kill_at(n):
    def hook(epoch):
        if epoch == n:
            raise Killed
    return hook


# -- checkpoints -----------------------------------------------------------------------

def test_checkpoint_holds_only_what_weights_only_loads(synthetic, tmp_path):
    s = spec()
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        T.train_pack([s], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False,
                     checkpoint_dir=ck, checkpoint_every=1, on_epoch=kill_at(2))
    st = torch.load(ck / T.CHECKPOINT, map_location="cpu", weights_only=True)
    assert st["epoch"] == 2
    assert torch.load(ck / T.PREVIOUS_CHECKPOINT, map_location="cpu", weights_only=True)["epoch"] == 1


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_training_restarts(synthetic, tmp_path, capfd):
    s = spec(epochs=2)
    ck = tmp_path / "ck"
    ck.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 1, "run_ids": [s.run_id], "payload": RunsCode(marker)}, ck / T.CHECKPOINT)
    with pytest.raises(pickle.UnpicklingError):   # the file really is such a pickle
        torch.load(ck / T.CHECKPOINT, weights_only=True)
    T.train_pack([s], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=ck)
    assert not marker.exists(), "loading the checkpoint ran its code"
    err = capfd.readouterr().err
    assert f"{ck / T.CHECKPOINT}: unreadable checkpoint" in err
    assert "restarting from epoch 0" in err
    assert Run(tmp_path / "runs" / s.run_id).verify() == []


def test_truncated_checkpoint_is_named_and_the_previous_one_resumes(synthetic, tmp_path, capfd):
    s = spec(epochs=4)
    T.train_pack([s], tmp_path / "a", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck_a")
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        T.train_pack([s], tmp_path / "b", device="cpu", dataset=synthetic, progress=False,
                     checkpoint_dir=ck, checkpoint_every=1, on_epoch=kill_at(3))
    data = (ck / T.CHECKPOINT).read_bytes()
    (ck / T.CHECKPOINT).write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    T.train_pack([s], tmp_path / "b", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=ck, checkpoint_every=1)
    err = capfd.readouterr().err
    assert f"{ck / T.CHECKPOINT}: unreadable checkpoint" in err
    assert f"resuming from {ck / T.PREVIOUS_CHECKPOINT} at epoch 2/4" in err
    assert_same_trajectory(tmp_path / "a" / s.run_id, tmp_path / "b" / s.run_id)
    assert not (ck / T.CHECKPOINT).exists() and not (ck / T.PREVIOUS_CHECKPOINT).exists()


def test_a_full_disk_warns_and_training_goes_on(synthetic, tmp_path, monkeypatch, capfd):
    s = spec(epochs=3)

    def full(path, data):
        if Path(path).name == T.CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device")
        atomic_write_bytes(path, data)

    monkeypatch.setattr(T, "atomic_write_bytes", full)
    T.train_pack([s], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    err = capfd.readouterr().err
    assert "checkpoint at epoch 1 not written (disk full" in err and "training goes on" in err
    assert Run(tmp_path / "runs" / s.run_id).info["epochs_completed"] == 3


# -- real processes: SIGTERM and the pack lock -------------------------------------------

def start_training(tmp_path: Path, s: RunSpec, out: Path, *extra: str) -> subprocess.Popen:
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps([s.to_dict()]))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rankbias", "train", str(pack), "--out", str(out),
                             "--device", "cpu", *extra], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    pytest.fail(f"no line with {text!r} from the training process:\n{''.join(lines)}")


def test_sigterm_checkpoints_exits_143_and_the_rerun_gives_the_same_trajectory(tmp_path):
    s = spec(epochs=30, width=64)
    out = tmp_path / "results" / "runs"
    ck = tmp_path / "results" / "packs" / pack_id([s])
    proc = start_training(tmp_path, s, out, "--checkpoint-every", "1000")
    wait_for_line(proc, "epoch 1/30")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(60) == T.PREEMPTED_EXIT == 143, rest
    assert "SIGTERM: checkpoint of epoch" in rest
    assert (ck / T.CHECKPOINT).exists(), "the checkpoint interval alone would have written none"
    stopped_at = torch.load(ck / T.CHECKPOINT, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 30
    assert not (out / s.run_id / "run.json").exists()
    rerun = start_training(tmp_path, s, out)
    err = rerun.stderr.read()
    assert rerun.wait(300) == 0, err
    assert f"resuming from {ck / T.CHECKPOINT} at epoch {stopped_at}/30" in err
    # The same process settings (threads), so that the same arithmetic runs.
    whole = start_training(tmp_path, s, tmp_path / "uninterrupted" / "runs")
    err = whole.stderr.read()
    assert whole.wait(300) == 0, err
    assert_same_trajectory(tmp_path / "uninterrupted" / "runs" / s.run_id, out / s.run_id)


def test_a_second_training_of_the_pack_fails_at_once_naming_the_holder(tmp_path):
    s = spec(epochs=200, width=64)
    out = tmp_path / "results" / "runs"
    first = start_training(tmp_path, s, out)
    try:
        wait_for_line(first, "epoch 1/200")
        t0 = time.time()
        second = start_training(tmp_path, s, out)
        err = second.stderr.read()
        assert second.wait(120) == 1, err
        assert time.time() - t0 < 60
        assert f"is already being trained by pid {first.pid} on host {socket.gethostname()}, started 20" in err
        assert first.poll() is None, "the first training goes on"
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the lock with its holder: a new training takes it.
    with T.pack_lock(T.lock_path(out, pack_id([s])), pack_id([s])):
        pass


def dvc_outputs() -> list[str]:
    """Every path dvc.yaml names as a stage's output (a figure stage's, its directory)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for entry in stage.get("do", stage).get("outs", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            outs.append(str(Path(path).parent) if "${" in path else path)
    return outs


def test_the_pack_lock_lies_outside_the_dvc_outputs_and_still_excludes(synthetic, tmp_path):
    s = spec(epochs=2)
    pid = pack_id([s])
    out, ck = tmp_path / "results" / "runs", tmp_path / "results" / "packs" / pid
    # as the workflow's train rule calls it: --out results/runs --checkpoint-dir results/packs/<pid>
    T.train_pack([s], out, device="cpu", dataset=synthetic, progress=False, checkpoint_dir=ck,
                 checkpoint_every=1)
    outs = dvc_outputs()
    assert "results/packs" in outs and "results/runs" in outs
    lock = T.lock_path(out, pid)
    assert lock.is_file(), "the lock is kept where every trainer of the pack looks for it"
    for o in outs:
        assert not lock.resolve().is_relative_to((tmp_path / o).resolve()), f"{lock} lies in the DVC output {o}"
        found = [p for p in (tmp_path / o).rglob("*") if "lock" in p.name]
        assert not found, f"lock files in the DVC output {o}: {found}"
    assert not ck.exists(), "the finished pack leaves no empty checkpoint directory behind"
    # git ignores it where the workflow puts it
    rel = lock.relative_to(tmp_path)
    assert subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT).returncode == 0, rel
    # and it still excludes: a second trainer of the pack, whatever its checkpoint directory
    with T.pack_lock(lock, pid):
        for other in (ck, None):
            with pytest.raises(T.PackLocked, match=f"{re.escape(str(lock))}: pack {pid} is already being trained"):
                T.train_pack([s], out, device="cpu", dataset=synthetic, progress=False, checkpoint_dir=other)


# -- a pack file's checks, before anything trains -------------------------------------------

def train_cli(*args: str):
    """`rankbias train` in a process of its own, its address space bounded (RLIMIT_AS, 8 GiB),
    so that a pack that would not fit fails there instead of taking the machine's memory."""
    import resource

    def bound():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rankbias", "train", *args, "--device", "cpu", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300, preexec_fn=bound)


def test_a_pack_file_listing_a_run_twice_trains_nothing(tmp_path):
    s = spec(epochs=2)
    pack = tmp_path / "twice.json"
    pack.write_text(json.dumps([s.to_dict(), spec(epochs=2, seed=1).to_dict(), s.to_dict()]))
    out = tmp_path / "results" / "runs"
    r = train_cli(str(pack), "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert f"pack file {pack}: run {s.run_id} is listed twice (runs 0 and 2)" in r.stderr
    assert not (tmp_path / "results").exists(), "nothing was written"


def test_a_pack_larger_than_the_host_is_refused_before_allocating(tmp_path):
    """The issue's case: `rankbias train` on a hand-made 3000-member pack. The direct path
    checks the memory as `rankbias plan` does, naming the file, the pack and the numbers."""
    from rankbias.plan.cluster import estimate_mem_mb
    specs = [RunSpec(dataset="synthetic", arch="mlp", depth=5, width=4000, seed=i) for i in range(3000)]
    pack = tmp_path / "big.json"
    pack.write_text(json.dumps([s.to_dict() for s in specs]))
    out = tmp_path / "results" / "runs"
    r = train_cli(str(pack), "--out", str(out))
    assert r.returncode == 1, r.stderr[-3000:]
    need = estimate_mem_mb(specs)
    assert (f"pack file {pack}: pack {pack_id(specs)} (3000 x MLP-5-4000 on synthetic): needs about "
            f"{need} MiB (rankbias.plan.cluster.estimate_mem_mb), more than the host's memory (") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "results").exists()
    # a limit given by hand: a pack that fits the host but not it
    small = tmp_path / "small.json"
    small.write_text(json.dumps([spec(epochs=2).to_dict()]))
    r = train_cli(str(small), "--out", str(out), "--device-memory-mb", "100")
    assert r.returncode == 1, r.stderr
    assert (f"pack file {small}: pack {pack_id([spec(epochs=2)])} (1 x MLP-2-16 on synthetic): needs about "
            f"{estimate_mem_mb([spec(epochs=2)])} MiB (rankbias.plan.cluster.estimate_mem_mb), more than "
            "device_memory_mb = 100") in r.stderr, r.stderr
    assert not (tmp_path / "results").exists()


def test_every_path_that_builds_a_pack_checks_its_memory_first(synthetic):
    """`Pack` itself (what `rankbias bench` and scripts/gpu_check.py build) checks it."""
    from rankbias.plan.cluster import estimate_mem_mb
    from rankbias.train.engine import Pack
    from rankbias.core.spec import SpecError
    specs = [spec(seed=i) for i in range(2)]
    with pytest.raises(SpecError, match=rf"pack {pack_id(specs)} \(2 x MLP-2-16 on synthetic\): needs about "
                                        rf"{estimate_mem_mb(specs)} MiB .*more than device_memory_mb = 100;"):
        Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu", memory_mb=100)
    huge = [RunSpec(dataset="synthetic", arch="mlp", depth=5, width=4000, seed=i) for i in range(3000)]
    with pytest.raises(SpecError, match=r"more than the host's memory \(\d+ MiB\)"):
        Pack(huge, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")


# -- SIGTERM in the last epoch --------------------------------------------------------------

def sigterm_at(n):
    def hook(epoch):
        if epoch == n:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_sigterm_in_the_last_epoch_stops_before_writing_runs_and_the_rerun_finishes(synthetic, tmp_path):
    """The hook after epoch 2 of 3 comes after that epoch's look at the flag: the signal
    is pending while the last epoch trains, and is honoured at its end."""
    specs = [spec(epochs=3, seed=i) for i in range(3)]
    ck = tmp_path / "ck"
    with pytest.raises(T.Preempted, match=rf"SIGTERM: checkpoint of epoch 3/3 in {re.escape(str(ck))}"):
        T.train_pack(specs, tmp_path / "b", device="cpu", dataset=synthetic, progress=False,
                     checkpoint_dir=ck, checkpoint_every=1000, on_epoch=sigterm_at(2))
    assert torch.load(ck / T.CHECKPOINT, weights_only=True)["epoch"] == 3
    assert not list(tmp_path.glob("b/*/run.json")), "no run was written"
    T.train_pack(specs, tmp_path / "b", device="cpu", dataset=synthetic, progress=False, checkpoint_dir=ck)
    T.train_pack(specs, tmp_path / "a", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck_a")
    for s in specs:
        assert Run(tmp_path / "b" / s.run_id).verify() == []
        assert_same_trajectory(tmp_path / "a" / s.run_id, tmp_path / "b" / s.run_id)


def test_sigterm_while_the_runs_are_written_stops_between_runs(synthetic, tmp_path, monkeypatch):
    """A SIGTERM that arrives while the pack writes its runs stops after the run being
    written: every run directory holds complete files, and the rerun writes the rest."""
    specs = [spec(epochs=2, seed=i) for i in range(3)]
    ck, out = tmp_path / "ck", tmp_path / "b"
    written = []

    def write_then_sigterm(run_dir, *a, **kw):
        write_run(run_dir, *a, **kw)
        written.append(run_dir)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(T, "write_run", write_then_sigterm)
    with pytest.raises(T.Preempted, match="SIGTERM after writing 1 of 3 runs: checkpoint of epoch 2/2"):
        T.train_pack(specs, out, device="cpu", dataset=synthetic, progress=False, checkpoint_dir=ck)
    assert len(written) == 1, "the pack stopped after the run it was writing"
    assert [p.parent.name for p in out.rglob("run.json")] == [written[0].name]
    assert not list(out.rglob("*.tmp")), "no half-written file"
    assert Run(written[0]).verify() == []
    monkeypatch.undo()
    T.train_pack(specs, out, device="cpu", dataset=synthetic, progress=False, checkpoint_dir=ck)
    T.train_pack(specs, tmp_path / "a", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck_a")
    for s in specs:
        assert_same_trajectory(tmp_path / "a" / s.run_id, out / s.run_id)


# -- divergence --------------------------------------------------------------------------

def test_a_finite_blow_up_is_divergence_marked_in_figures_and_excluded_from_claims(synthetic, tmp_path):
    ok, wild = spec(epochs=3, seed=0), spec(epochs=3, seed=1, lr=1000.0, momentum=0.0, weight_decay=0.0)
    T.train_pack([ok, wild], tmp_path, device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck")
    w = Run(tmp_path / wild.run_id)
    div = w.info["diverged"]
    assert div is not None and div["epoch"] == 1, "lr=1000 must count as diverged"
    # The loss stayed finite: it is the blow-up rule, not NaN/inf, that caught it.
    assert f"above {T.BLOWUP_FACTOR:g} times its initial" in div["reason"], div
    assert not Run(tmp_path / ok.run_id).diverged
    assert figures.load_run(w).diverged_epoch == 1
    result = claims.judge([Run(tmp_path / ok.run_id), w])
    assert result["runs"]["diverged"] == 1 and result["runs"]["judged"] == 1
    assert [d["run_id"] for d in result["diverged_runs"]] == [wild.run_id]


def test_a_resume_where_every_member_had_diverged_trains_no_further(synthetic, tmp_path):
    """A checkpoint written at the epoch where the last member diverged (as a SIGTERM or
    a kill there leaves it) resumes into the runs the uninterrupted pack writes."""
    wild = spec(epochs=3, seed=1, lr=1000.0, momentum=0.0, weight_decay=0.0)
    T.train_pack([wild], tmp_path / "a", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck_a")
    with pytest.raises(Killed):
        T.train_pack([wild], tmp_path / "b", device="cpu", dataset=synthetic, progress=False,
                     checkpoint_dir=tmp_path / "ck", checkpoint_every=1, on_epoch=kill_at(1))
    T.train_pack([wild], tmp_path / "b", device="cpu", dataset=synthetic, progress=False,
                 checkpoint_dir=tmp_path / "ck")
    assert Run(tmp_path / "a" / wild.run_id).info["epochs_completed"] == 1
    assert_same_trajectory(tmp_path / "a" / wild.run_id, tmp_path / "b" / wild.run_id)


# -- run files ---------------------------------------------------------------------------

def _frames():
    metrics = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5]})
    layers = pd.DataFrame({"epoch": [0, 1], "layer": ["fc1", "fc1"], "index": [0, 0],
                           "kind": ["hidden", "hidden"]})
    spectra = {"epochs": np.array([0, 1]), "layers": np.array(["fc1"]), "sv_0": np.ones((2, 3))}
    return metrics, layers, spectra


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_run(tmp_path / "r", {"run_id": "r"}, *_frames())
        atomic_write_bytes(tmp_path / "figure.png", b"png")
    finally:
        os.umask(old)
    for f in [*(tmp_path / "r").iterdir(), tmp_path / "figure.png"]:
        assert f.stat().st_mode & 0o777 == mode, f


def test_a_write_killed_before_its_rename_leaves_no_temporary_in_the_finished_run(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    stale = run_dir / ".run.json.k2j4x9.tmp"   # what a SIGKILL during atomic_write_bytes leaves
    stale.write_text("{")
    write_run(run_dir, {"run_id": "r"}, *_frames())
    assert sorted(p.name for p in run_dir.iterdir()) == ["layers.parquet", "metrics.parquet",
                                                         "run.json", "spectra.npz"]


def test_a_truncated_spectra_file_is_named(tmp_path):
    write_run(tmp_path / "r", {"run_id": "r"}, *_frames())
    f = tmp_path / "r" / "spectra.npz"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(RunError, match=f"{f}: unreadable") as e:
        _ = Run(tmp_path / "r").spectra
    assert not isinstance(e.value, zipfile.BadZipFile)
