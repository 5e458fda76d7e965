"""One GPU per training job on a multi-GPU workstation.

Snakemake's local executor counts GPUs as a resource (`--resources gpu=N`) but does
not say which device a job should use, so N concurrent jobs would all land on GPU 0.
`acquire_gpu` gives each job its own device: it takes an exclusive `fcntl` lock on
one of the files `slot<i>.lock` (one per device) and sets `CUDA_VISIBLE_DEVICES` to
that device before CUDA is initialised. The kernel drops the lock when the process
exits, however it exits, so a killed job never leaves a device reserved.

On SLURM the scheduler has already chosen the device (it sets `CUDA_VISIBLE_DEVICES`
for a job that asked for a GPU); then nothing is locked and nothing changed. Only when
a job was given several GPUs (grouped jobs) do its training steps share them through
slots, in a lock directory of that job's own.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

ENV_COUNT = "RANKBIAS_GPU_COUNT"          # number of devices (default: torch.cuda.device_count())
ENV_LOCK_DIR = "RANKBIAS_GPU_LOCK_DIR"    # where the slot<i>.lock files live
ENV_TIMEOUT = "RANKBIAS_GPU_TIMEOUT"      # seconds to wait for a free device
ENV_SLOT = "RANKBIAS_GPU_SLOT"            # set while a slot is held, so nested calls reuse it
DEFAULT_TIMEOUT = 24 * 3600.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class GpuTimeoutError(TimeoutError):
    """Every device stayed busy for longer than the timeout."""


def default_lock_dir() -> Path:
    """Shared by every user of the machine, since the devices are."""
    return Path(os.environ.get(ENV_LOCK_DIR) or Path(tempfile.gettempdir()) / "rankbias-gpu-locks")


def nvidia_driver_present(root: str = "/") -> bool:
    """False only where this is Linux and no NVIDIA kernel driver is loaded (neither
    /proc/driver/nvidia nor a /dev/nvidia* device node): there can be no CUDA device."""
    if not sys.platform.startswith("linux"):
        return True
    base = Path(root)
    return (base / "proc/driver/nvidia").exists() or any((base / "dev").glob("nvidia*"))


def device_count() -> int:
    raw = os.environ.get(ENV_COUNT)
    if raw is not None and raw.strip() != "":
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_COUNT}: expected a whole number of GPUs, got {raw!r}") from None
        if n < 0:
            raise ValueError(f"{ENV_COUNT}: expected a whole number of GPUs >= 0, got {raw!r}")
        return n
    try:
        import torch
    except ImportError:
        return 0
    if not torch.backends.cuda.is_built():
        return 0
    # Count through NVML: unlike torch.cuda.device_count()'s fallback (cudaGetDeviceCount),
    # it leaves the CUDA driver of this process uninitialised, so CUDA_VISIBLE_DEVICES can
    # still choose the device afterwards.
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    n = -1
    if count_nvml is not None:
        with contextlib.suppress(Exception):
            n = int(count_nvml())
    if n >= 0:
        return n
    if not nvidia_driver_present():
        return 0            # the probe below would spend ~2 s importing torch to say so
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=300)
    try:
        return int(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"acquire_gpu: could not count GPUs ({probe.stderr.strip()[-300:]}); "
                           f"set {ENV_COUNT}") from None


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _cuda_driver_loaded() -> bool:
    """Whether libcuda is mapped into this process: a sign that the driver (and with it
    the set of visible devices) may already be fixed, e.g. by torch.cuda.is_available()."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _assigned_by_scheduler() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and "CUDA_VISIBLE_DEVICES" in os.environ


def _open_slot(lock_dir: Path, device: str) -> int:
    path = lock_dir / f"slot{_SAFE.sub('_', device)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # other users' jobs share the devices, so the lock files too
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _holder(lock_dir: Path, device: str) -> str:
    try:
        return (lock_dir / f"slot{_SAFE.sub('_', device)}.lock").read_text().strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def acquire_gpu(n_devices: int | None = None, lock_dir: str | os.PathLike | None = None,
                timeout: float | None = None, poll: float = 0.5) -> Iterator[int | None]:
    """Hold one GPU for the duration of the block; yields its index.

    n_devices: devices to share (default env RANKBIAS_GPU_COUNT, else
    torch.cuda.device_count()). If `CUDA_VISIBLE_DEVICES` lists several devices
    (and no scheduler set it), those are the devices shared. Blocks, polling every
    `poll` seconds, until a device is free; raises GpuTimeoutError after `timeout`
    seconds (default env RANKBIAS_GPU_TIMEOUT, else 24 hours).

    Yields None, locking nothing, when there is no GPU to choose: SLURM assigned the
    job one device (SLURM_JOB_ID and CUDA_VISIBLE_DEVICES set), the caller already set
    a single device, or the machine has none. Inside an outer acquire_gpu block it
    yields the outer block's device.
    """
    if os.environ.get(ENV_SLOT):
        yield int(os.environ[ENV_SLOT])
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    scheduled = _assigned_by_scheduler()  # implies CUDA_VISIBLE_DEVICES is set
    if scheduled and visible is not None and len([d for d in visible.split(",") if d.strip()]) <= 1:
        yield None
        return
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if n_devices is not None:
            devices = devices[:n_devices]
    else:
        n = device_count() if n_devices is None else int(n_devices)
        if n < 0:
            raise ValueError(f"n_devices: expected a number of GPUs >= 0, got {n_devices!r}")
        devices = [str(i) for i in range(n)]
    if not devices or (visible is not None and len(devices) == 1):
        yield None
        return
    if _cuda_initialised():
        raise RuntimeError("acquire_gpu: CUDA is already initialised in this process, so "
                           "CUDA_VISIBLE_DEVICES can no longer choose the device; call it "
                           "before any CUDA work")
    if _cuda_driver_loaded():
        warnings.warn("acquire_gpu: the CUDA driver is already loaded in this process; if it "
                      "was initialised (torch.cuda.is_available() does that), the device set "
                      "through CUDA_VISIBLE_DEVICES is ignored. Call acquire_gpu first.",
                      RuntimeWarning, stacklevel=3)
    if timeout is None:
        raw = os.environ.get(ENV_TIMEOUT)
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT}: expected seconds, got {raw!r}") from None

    if lock_dir is not None:
        lock_dir = Path(lock_dir)
    elif scheduled:
        # SLURM may number a job's devices from 0 in every job: slots are per job.
        lock_dir = default_lock_dir() / f"slurm-{os.environ['SLURM_JOB_ID']}"
    else:
        lock_dir = default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if lock_dir.stat().st_uid == os.getuid():
            lock_dir.chmod(0o1777)

    deadline = time.monotonic() + timeout
    while True:
        for index, device in enumerate(devices):  # noqa: B007 - index is used after the break
            fd = _open_slot(lock_dir, device)
            if _try_lock(fd):
                break
            os.close(fd)
        else:
            if time.monotonic() >= deadline:
                held = ", ".join(f"{d} by {_holder(lock_dir, d)}" for d in devices)
                raise GpuTimeoutError(
                    f"acquire_gpu: all {len(devices)} GPU slot(s) in {lock_dir} stayed busy for "
                    f"{timeout:g} s (held: {held}); raise {ENV_TIMEOUT} or run fewer jobs at once")
            time.sleep(poll)
            continue
        break

    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", ENV_SLOT)}
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    os.environ[ENV_SLOT] = device if device.isdigit() else str(index)
    try:
        yield int(device) if device.isdigit() else index
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the lock
