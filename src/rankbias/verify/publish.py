"""`rankbias publish`: the committed results' DVC cache as static files, for anyone to
`dvc pull` over HTTP(S) with no credentials.

The folder holds every object the committed ``dvc.lock`` names as an output (a file, or
a directory's file list ``<md5>.dir`` and every file in it) at the path DVC's HTTP
remote reads, ``files/md5/<first two hex digits>/<the other thirty>``. Each object is
re-hashed as it is copied, so a corrupt cache object is an error, never published.
Beside the objects:

- ``manifest.json``: the git commit and ``dvc.lock`` (sha256) the objects belong to, and
  each object's path, md5, sha256, size and the outputs it holds;
- ``dvc.lock``: the committed lock, which maps the objects to the repository's paths;
- ``SHA256SUMS``: the sha256 of every other file, for ``sha256sum -c SHA256SUMS``.

Any web server or release host that serves the folder's files at their paths is a
read-only DVC remote (`python -m http.server --directory dist/results-cache` on one
machine). ``--archive`` also writes the folder as one ``.tar.gz`` (sorted members, owner
0, the commit's time), the file to deposit for a DOI snapshot. Nothing depends on when
or where it runs: publishing the same commit again writes the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from rankbias.verify import dvcstate
from rankbias.core.io import file_digest
from rankbias import __version__

SCHEMA = "rankbias-published-dvc-cache/1"
DEFAULT_OUT = "dist/results-cache"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
CHUNK = 1 << 20


class PublishError(RuntimeError):
    pass


@dataclass
class CacheObject:
    md5: str                                           # DVC's name: 32 hex digits (.dir for a directory)
    outputs: set[str] = field(default_factory=set)     # the repository paths it holds

    @property
    def rel(self) -> str:
        """Its path in a DVC 3 remote (and cache)."""
        return f"files/md5/{self.md5[:2]}/{self.md5[2:]}"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def committed_lock(root: Path) -> tuple[str, int]:
    """(commit, commit time) of HEAD, whose ``dvc.lock`` must equal the working tree's:
    the published objects must be the ones a clone of that commit pulls."""
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise PublishError(f"{root}: not a git repository with a commit ({head.stderr.strip()})")
    if _git(root, "ls-files", "--error-unmatch", "dvc.lock").returncode != 0:
        raise PublishError("dvc.lock is not committed: `dvc commit`, then `git add dvc.lock && git commit`")
    if _git(root, "diff", "--quiet", "HEAD", "--", "dvc.lock").returncode != 0:
        raise PublishError("dvc.lock differs from the commit: commit it first, so that a clone "
                           "of the commit pulls exactly what is published")
    when = _git(root, "log", "-1", "--format=%ct", "HEAD").stdout.strip()
    return head.stdout.strip(), int(when or 0)


def cache_objects(root: Path) -> dict[str, CacheObject]:
    """Every object the outputs in ``dvc.lock`` consist of, by md5; a directory's file list
    is read from the DVC cache (an error when it is not there)."""
    objects: dict[str, CacheObject] = {}

    def add(md5: str, output: str) -> None:
        objects.setdefault(md5, CacheObject(md5)).outputs.add(output)

    for e in dvcstate.lock_entries(root):
        if e.kind != "out":
            continue
        md5 = dvcstate.check_md5(e.md5, f"dvc.lock stage {e.stage} out {e.path}")
        add(md5, e.path)
        if md5.endswith(".dir"):
            listing = dvcstate.dir_manifest(root, md5)
            if listing is None:
                raise PublishError(f"{e.path} (stage {e.stage}): its file list {md5} is not in the DVC "
                                   f"cache ({dvcstate.cache_object(root, md5)}); `dvc commit` or `dvc fetch` first")
            for rel, file_md5 in listing.items():
                add(dvcstate.check_md5(file_md5, f"{md5} entry {rel}"), f"{e.path}/{rel}")
    if not objects:
        raise PublishError("dvc.lock records no output: run the pipeline and `dvc commit` first")
    return objects


def _copy_hashed(src: Path, dest: Path) -> tuple[str, str, int]:
    """Copy `src` to `dest`, returning (md5, sha256, size) of the bytes copied."""
    md5, sha, size = hashlib.md5(), hashlib.sha256(), 0
    with open(src, "rb") as f, open(dest, "wb") as g:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            g.write(chunk)
            size += len(chunk)
    return md5.hexdigest(), sha.hexdigest(), size


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _is_published(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def publish(root: str | Path = ".", out: str | Path = DEFAULT_OUT, archive: str | Path | None = None) -> dict:
    """Write the published folder `out` (replacing an earlier one) and, with `archive`, its
    ``.tar.gz``; returns the manifest."""

    root = Path(root).resolve()
    out = Path(out) if Path(out).is_absolute() else root / out
    commit, commit_time = committed_lock(root)
    objects = cache_objects(root)
    if out.exists() and not _is_published(out):
        raise PublishError(f"{out} exists and is not a folder `rankbias publish` wrote; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries: list[dict] = []
        for md5 in sorted(objects):
            obj = objects[md5]
            src = dvcstate.cache_object(root, md5)
            if not src.is_file():
                raise PublishError(f"{', '.join(sorted(obj.outputs)[:3])}: cache object {src} is missing; "
                                   "`dvc commit` or `dvc fetch` first")
            dest = tmp / obj.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            got, sha, size = _copy_hashed(src, dest)
            if got != md5.removesuffix(".dir"):
                raise PublishError(f"cache object {src} ({', '.join(sorted(obj.outputs)[:3])}) hashes to {got}, "
                                   f"not {md5}: it is corrupt; delete it and `dvc fetch` it again")
            entries.append({"path": obj.rel, "md5": md5, "sha256": sha, "size": size,
                             "outputs": sorted(obj.outputs)})
        shutil.copyfile(root / "dvc.lock", tmp / "dvc.lock")
        manifest = {
            "schema": SCHEMA,
            "description": "DVC cache objects of the rankbias results recorded in dvc.lock, in the "
                           "layout DVC's HTTP remote reads (files/md5/xx/...)",
            "commit": commit,
            "dvc_lock_sha256": _sha256(tmp / "dvc.lock"),
            "rankbias_version": __version__,
            "objects": entries,
            "total_size": sum(e["size"] for e in entries),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / SUMS).write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in files))
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)   # what a web server needs to read
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if archive is not None:
        write_archive(out, Path(archive), commit_time)
    return manifest


def write_archive(folder: Path, archive: Path, mtime: int) -> str:
    """`folder` as a reproducible ``.tar.gz`` (members sorted, owner 0, every time `mtime`),
    unpacking to ``<folder name>/``; returns its sha256."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(archive, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [folder, *sorted(folder.rglob("*"))]:
            info = tar.gettarinfo(str(p), arcname=(Path(folder.name) / p.relative_to(folder)).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            info.mode = 0o755 if p.is_dir() else 0o644
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return _sha256(archive)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "publish", help="write the committed results' DVC cache as static files for a read-only HTTP(S) remote",
        description=__doc__.split("\n\n")[0],
        epilog="Serve the folder at the address of the `public` remote in .dvc/config "
               "(`dvc remote modify public url https://...`); readers then `dvc pull` and `rankbias restore`.")
    p.add_argument("--root", default=".", help="repository root (default: .)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    p.add_argument("--archive", default=None,
                   help="also write the folder as this reproducible .tar.gz (for a DOI deposit)")
    p.set_defaults(func=_cmd_publish)


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        m = publish(args.root, args.out, args.archive)
    except (PublishError, dvcstate.DvcStateError) as e:
        raise RuntimeError(str(e)) from None
    print(f"publish: {len(m['objects'])} object(s), {m['total_size']} bytes, commit {m['commit'][:12]}, "
          f"in {args.out} ({MANIFEST}, {SUMS}, dvc.lock)")
    if args.archive:
        print(f"archive: {args.archive} sha256 {_sha256(Path(args.archive))}")
    return 0
