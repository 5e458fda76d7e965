"""Atomic writes, digests and canonical JSON: how every rankbias output reaches the disk.

A file is written to a temporary beside it, fsynced, then renamed into place, so a crash
leaves the old file or the new one, never half of one; a set of files (a figure's PNG,
PDF and record; the claims outputs) is renamed only once every member is on disk.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

_TMP_RE = re.compile(r"^\..+\.tmp$")


# -- atomic writes ---------------------------------------------------------------

def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask
    can only be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename. The file gets
    the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600, so
    results on a shared filesystem are as readable as the user's umask allows."""
    atomic_write_set({Path(path): data})


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """What atomic_write_json writes."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def atomic_write_set(files: Mapping[Path, bytes]) -> None:
    """Replace several files as one set: every one is written to a temporary beside it
    and fsynced before the first is renamed into place, so a failure while writing
    (an error, a full disk) replaces none. Only a kill between the renames, a few
    microseconds, can leave a mixed set; the claims' provenance record, renamed last,
    then no longer matches and the audit names it."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str).encode()


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files a write killed before its rename left behind."""
    if directory.is_dir():
        for p in directory.iterdir():
            if _TMP_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
