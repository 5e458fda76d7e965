"""DVC's records, read without importing DVC: ``dvc.lock`` entries, DVC 3's md5 hashes
of files and directories, the cache and the directory file lists stored in it.

Every path these records name is untrusted input (a crafted ``dvc.lock`` or cache
object can say anything): ``repo_path`` resolves it, symbolic links included, and
accepts it only inside the repository's ``data/`` or ``results/``, the only places the
pipeline writes. ``first_link`` finds a symbolic link on a path without following it:
restore acts only on real files and directories, since moving what a link resolves to
would move whatever it points at.
"""
from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from rankbias.core.io import file_digest

# The repository directories whose files DVC versions and restore may check or move.
MANAGED_DIRS = ("data", "results")
_MD5_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


class DvcStateError(RuntimeError):
    pass


@dataclass(frozen=True)
class LockEntry:
    stage: str
    kind: str  # "dep" or "out"
    path: str
    md5: str


def repo_path(root: str | Path, path: str | Path, entry: str) -> Path:
    """`path` (relative to `root`, as DVC and provenance records write it) resolved, if it
    lies inside `root`/data or `root`/results; otherwise DvcStateError naming `entry`."""
    base = Path(root).resolve()
    resolved = (base / path).resolve()
    for d in MANAGED_DIRS:
        top = base / d
        if resolved == top or top in resolved.parents:
            return resolved
    raise DvcStateError(f"{entry}: path {str(path)!r} resolves to {resolved}, outside "
                        f"{' and '.join(str(base / d) for d in MANAGED_DIRS)}; refused")


def first_link(root: str | Path, path: str | Path) -> Path | None:
    """The first symbolic link on `path` (`root`/..., taken as written, not resolved): one
    of the directories between `root` and it, or `path` itself; None when there is none or
    `path` is not written under `root` (``repo_path`` judges those)."""
    root = Path(root)
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return None
    cur = root
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            return cur
    return None


def cache_types(root: str | Path) -> list[str]:
    """``cache.type`` of .dvc/config(.local), as the list DVC reads (e.g. "reflink,copy")."""
    found = _cache_option(root, "type")
    return [t.strip() for t in found.split(",") if t.strip()] if found else []


def check_md5(md5: str, entry: str) -> str:
    """`md5` if it is a DVC 3 hash (32 hex digits, `.dir` for a directory), which is all
    that may go into a cache path; otherwise DvcStateError naming `entry`."""
    if not _MD5_RE.match(md5):
        raise DvcStateError(f"{entry}: md5 {md5!r} is not 32 hex digits (optionally .dir); refused")
    return md5


def lock_entries(root: str | Path) -> list[LockEntry]:
    """Every dep and out with an md5 in ``<root>/dvc.lock``."""
    lock = Path(root) / "dvc.lock"
    try:
        data = yaml.safe_load(lock.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DvcStateError(f"{lock}: unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise DvcStateError(f"{lock}: expected a mapping with key 'stages' (DVC lock schema 2.0)")
    out = []
    for stage, body in data["stages"].items():
        for kind in ("deps", "outs"):
            for item in (body or {}).get(kind) or []:
                if isinstance(item, dict) and item.get("path") and item.get("md5"):
                    out.append(LockEntry(stage, kind[:-1], str(item["path"]), str(item["md5"])))
    return out


def md5_file(path: str | Path) -> str:
    """DVC 3's hash of a file: the md5 of its bytes."""
    return file_digest(path, "md5")


def dir_md5(path: str | Path) -> tuple[str, dict[str, str]]:
    """DVC 3's hash of a directory (``<md5>.dir``) and its file list {relpath: md5}.

    The hash is the md5 of the JSON list of {"md5", "relpath"} sorted by relpath, as
    DVC writes it into the cache. (No .dvcignore handling: for checking only.)"""
    path = Path(path)
    manifest = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            manifest[p.relative_to(path).as_posix()] = md5_file(p)
    entries = [{"md5": manifest[k], "relpath": k} for k in sorted(manifest)]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir", manifest


def _cache_option(root: str | Path, option: str) -> str | None:
    """`option` of the [cache] section, config.local overriding config, as DVC reads them."""
    found = None
    for name in ("config", "config.local"):
        cp = configparser.ConfigParser()
        try:
            cp.read(Path(root) / ".dvc" / name)
        except configparser.Error:
            continue
        if cp.has_option("cache", option):
            found = cp.get("cache", option)
    return found


def cache_dir(root: str | Path) -> Path:
    """The DVC cache directory: ``cache.dir`` of .dvc/config(.local), else .dvc/cache."""
    dvc = Path(root) / ".dvc"
    found = _cache_option(root, "dir")
    if found is None:
        return dvc / "cache"
    p = Path(os.path.expanduser(found))
    return p if p.is_absolute() else dvc / p


def cache_object(root: str | Path, md5: str) -> Path:
    """The cache file of hash `md5` (which must have passed ``check_md5``)."""
    return cache_dir(root) / "files" / "md5" / md5[:2] / md5[2:]


def dir_manifest(root: str | Path, md5: str) -> dict[str, str] | None:
    """{relpath: md5} of a directory as DVC recorded it, or None if not in the cache."""
    p = cache_object(root, md5)
    try:
        entries = json.loads(p.read_text())
        return {str(e["relpath"]): str(e["md5"]) for e in entries}
    except (OSError, ValueError, TypeError, KeyError):
        return None
