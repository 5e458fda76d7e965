"""The GPU slot allocator, with a faked device count: real processes, real fcntl locks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rankbias.train.gpus import GpuTimeoutError, acquire_gpu

# A worker: take a slot, report it, hold it until the file `release` appears.
WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from rankbias.train.gpus import acquire_gpu
    lock_dir, out, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with acquire_gpu(lock_dir=lock_dir, poll=0.05) as index:
        out.write_text(json.dumps({"index": index,
                                   "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
        while not release.exists():
            time.sleep(0.02)
""")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "RANKBIAS_GPU_SLOT")}
    env.update(extra)
    return env


def _start(tmp_path, name, env):
    out = tmp_path / f"{name}.json"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "locks"), str(out),
                             str(tmp_path / "release")], env=env)
    return proc, out


def _wait_for(paths, procs, limit=60.0):
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        for proc in procs:
            assert proc.poll() is None, f"worker exited early with status {proc.returncode}"
        assert time.monotonic() < deadline, "workers did not report a slot"
        time.sleep(0.02)
    return [json.loads(p.read_text()) for p in paths]


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "RANKBIAS_GPU_SLOT", "RANKBIAS_GPU_COUNT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_concurrent_processes_get_distinct_devices(tmp_path):
    env = _env(RANKBIAS_GPU_COUNT="3")
    procs, outs = zip(*[_start(tmp_path, f"w{i}", env) for i in range(3)])
    try:
        got = _wait_for(outs, procs)
    finally:
        (tmp_path / "release").touch()
        for p in procs:
            p.wait(timeout=60)
    # All three hold their slot at the same time (none has been released yet).
    assert sorted(g["index"] for g in got) == [0, 1, 2]
    assert sorted(g["visible"] for g in got) == ["0", "1", "2"]
    assert all(p.returncode == 0 for p in procs)


def test_waiting_process_gets_the_slot_a_finished_job_releases(tmp_path):
    env = _env(RANKBIAS_GPU_COUNT="1")
    first, first_out = _start(tmp_path, "first", env)
    [got] = _wait_for([first_out], [first])
    assert got == {"index": 0, "visible": "0"}
    second, second_out = _start(tmp_path, "second", env)
    try:
        # The second worker cannot have a slot while the first holds the only one;
        # kill -9 the holder: the kernel drops its lock and the waiter proceeds.
        time.sleep(1.0)  # give the waiter time to (wrongly) take the busy slot
        assert second.poll() is None and not second_out.exists()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        [got2] = _wait_for([second_out], [second])
        assert got2 == {"index": 0, "visible": "0"}
    finally:
        (tmp_path / "release").touch()
        second.wait(timeout=60)
        if first.poll() is None:
            first.kill()


def test_all_busy_times_out_naming_the_holders(tmp_path, clean_env):
    env = _env(RANKBIAS_GPU_COUNT="2")
    procs, outs = zip(*[_start(tmp_path, f"w{i}", env) for i in range(2)])
    try:
        _wait_for(outs, procs)
        with pytest.raises(GpuTimeoutError, match=r"all 2 GPU slot\(s\).*held: 0 by pid \d+"):
            with acquire_gpu(n_devices=2, lock_dir=tmp_path / "locks", timeout=0.3, poll=0.05):
                pass
    finally:
        (tmp_path / "release").touch()
        for p in procs:
            p.wait(timeout=60)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_sets_and_restores_environment_and_nests(tmp_path, clean_env):
    with acquire_gpu(n_devices=2, lock_dir=tmp_path) as index:
        assert index == 0
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        # A nested call (e.g. a subprocess of the same job) reuses the held device
        # instead of waiting for a second one.
        with acquire_gpu(n_devices=2, lock_dir=tmp_path, timeout=0.1) as inner:
            assert inner == 0
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "RANKBIAS_GPU_SLOT" not in os.environ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot0.lock"]


def test_respects_a_device_chosen_by_slurm(tmp_path, clean_env):
    clean_env.setenv("SLURM_JOB_ID", "42")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3")
    with acquire_gpu(n_devices=8, lock_dir=tmp_path / "locks") as index:
        assert index is None
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()


def test_shares_only_the_devices_the_user_made_visible(tmp_path, clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with acquire_gpu(lock_dir=tmp_path) as a:
        assert (a, os.environ["CUDA_VISIBLE_DEVICES"]) == (2, "2")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot2.lock"]


def test_no_gpu_means_no_lock(tmp_path, clean_env):
    clean_env.setenv("RANKBIAS_GPU_COUNT", "0")
    with acquire_gpu(lock_dir=tmp_path / "locks") as index:
        assert index is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()


def test_bad_device_count_names_the_variable(tmp_path, clean_env):
    clean_env.setenv("RANKBIAS_GPU_COUNT", "two")
    with pytest.raises(ValueError, match="RANKBIAS_GPU_COUNT.*'two'"):
        with acquire_gpu(lock_dir=tmp_path):
            pass


def test_several_gpus_given_to_one_slurm_job_are_shared_in_a_job_lock_dir(tmp_path, clean_env):
    clean_env.setenv("SLURM_JOB_ID", "77")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    clean_env.setenv("RANKBIAS_GPU_LOCK_DIR", str(tmp_path))
    with acquire_gpu() as index:
        assert (index, os.environ["CUDA_VISIBLE_DEVICES"]) == (0, "0")
    assert [p.name for p in (tmp_path / "slurm-77").iterdir()] == ["slot0.lock"]


def test_no_nvidia_driver_means_no_devices_without_a_probe(tmp_path, clean_env, monkeypatch):
    """Where NVML is missing and Linux shows no NVIDIA driver, device_count says 0 at
    once instead of starting a Python to ask torch (2 s a training job on a CPU)."""
    from rankbias.train import gpus
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc/driver").mkdir(parents=True)
    assert not gpus.nvidia_driver_present(str(tmp_path))
    (tmp_path / "dev/nvidiactl").touch()
    assert gpus.nvidia_driver_present(str(tmp_path))
    (tmp_path / "dev/nvidiactl").unlink()
    (tmp_path / "proc/driver/nvidia").mkdir()
    assert gpus.nvidia_driver_present(str(tmp_path))
    if not gpus.nvidia_driver_present():
        def no_probe(*a, **k):
            raise AssertionError("device_count started a probe on a machine without a driver")
        monkeypatch.setattr(gpus.subprocess, "run", no_probe)
        assert gpus.device_count() == 0
