"""Provenance: where a result came from, recorded beside it and inside it.

``collect()`` describes the environment that is producing an output right now (code
commit, package versions, host, device, container image, time). The trainer stores it
in each run's ``run.json``; ``figure_provenance()`` gathers, for one figure, the runs
it drew from (spec, run_id, file hashes, each run's own provenance, dataset
checksums) plus the environment that drew it. ``save_figure()`` writes the PNG and PDF
with that record embedded and a ``<stem>.provenance.json`` sidecar beside them;
``read_embedded()`` reads it back from either image format with plain Python. The
claims table, which cannot embed it, gets the same record from ``record_bytes()``, with
the sha256 of its Markdown and JSON.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import re
import socket
import subprocess
import warnings
import zlib
from importlib import metadata as _md
from pathlib import Path
from typing import Iterable, Mapping

from rankbias.core.io import atomic_write_bytes, atomic_write_json, json_bytes, sha256_file, utc_now
from rankbias.store import metrics as M
from rankbias.store.provenance_page import page_bytes, page_path

SCHEMA = 1
# Key of the embedded record: a PNG text chunk keyword and a PDF info dictionary key.
PNG_KEY = "rankbias:provenance"
PDF_KEY = "RankbiasProvenance"
# Distributions whose versions a result depends on (absent ones are recorded as null).
PACKAGES = ("rankbias", "torch", "torchvision", "numpy", "pandas", "pyarrow", "matplotlib",
            "pyyaml", "snakemake", "snakemake-executor-plugin-slurm", "dvc")
APPTAINER_LABELS = Path("/.singularity.d/labels.json")
# The directory of the package that is running (rankbias.__file__'s), whatever put it
# first on sys.path: the checkout's src/, an installed copy, an image's.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
NOT_A_CHECKOUT = "not a git checkout"


class ProvenanceError(RuntimeError):
    """A provenance record is missing, unreadable or malformed. ``detail`` is the message
    without the file's path, for callers that name the file their own way."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail if detail is not None else message


# -- the environment producing an output -------------------------------------------

def _git(args: list[str], cwd: Path) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_version(root: str | Path | None = None) -> dict:
    """Commit, dirty flag and ``git describe`` of the repository containing `root`
    (default: the current directory). Outside a git repository every field is null.

    "dirty" follows ``git describe --dirty``: tracked files differ from HEAD.
    """
    cwd = Path(root) if root is not None else Path.cwd()
    describe = _git(["describe", "--always", "--dirty", "--abbrev=12"], cwd)
    commit = _git(["rev-parse", "--verify", "-q", "HEAD"], cwd) if describe is not None else None
    if describe is None or commit is None:
        return {"commit": None, "dirty": None, "describe": None}
    return {"commit": commit, "dirty": describe.endswith("-dirty"), "describe": describe}


def source_hash(package_dir: str | Path) -> tuple[str, int]:
    """(sha256, number of files) over a package's ``.py`` files: for each, in the order of
    their POSIX paths relative to `package_dir`, the path, a NUL, the length in bytes, a
    NUL and the content. Caches, data files and timestamps do not count."""
    base = Path(package_dir)
    h = hashlib.sha256()
    rels = sorted(p.relative_to(base).as_posix() for p in base.rglob("*.py") if p.is_file())
    for rel in rels:
        data = (base / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest(), len(rels)


@functools.lru_cache(maxsize=1)
def package_source() -> dict:
    """The code that is running: where the imported package lies, the hash of its sources
    (``source_hash``) and the git state of the tree that holds them (commit, dirty flag,
    ``git describe``), or ``"not a git checkout"``. Unlike ``code_version()``, which
    describes the current directory, this names what Python imported."""
    digest, n = source_hash(PACKAGE_DIR)
    git = code_version(PACKAGE_DIR)
    return {"location": str(PACKAGE_DIR), "sources_sha256": digest, "files": n,
            "git": git if git["commit"] is not None else NOT_A_CHECKOUT}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_info(device: str | None = None) -> dict:
    """``{type, name}`` for a torch device string ("cpu", "cuda", "cuda:1", "auto")."""
    dev = (device or "cpu").strip()
    kind = dev.split(":", 1)[0]
    if kind == "auto":
        import torch
        kind, dev = ("cuda", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
    if kind == "cuda":
        try:
            import torch
            index = int(dev.split(":", 1)[1]) if ":" in dev else torch.cuda.current_device()
            return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index)}
        except Exception as e:  # noqa: BLE001 - record what we could not learn
            return {"type": "cuda", "index": None, "name": None, "error": str(e)}
    return {"type": kind, "name": _cpu_model()}


def container_info() -> dict:
    """Image digest and name when running inside the project's container image.

    The Docker image cannot know its own digest, so the launcher passes it in
    RANKBIAS_IMAGE_DIGEST; an Apptainer image carries its labels in the image.
    """
    labels: dict = {}
    try:
        labels = json.loads(APPTAINER_LABELS.read_text())
    except (OSError, ValueError):
        labels = {}
    digest = (os.environ.get("RANKBIAS_IMAGE_DIGEST")
              or labels.get("RANKBIAS_IMAGE_DIGEST")
              or labels.get("org.opencontainers.image.digest"))
    image = (os.environ.get("RANKBIAS_IMAGE")
             or labels.get("RANKBIAS_IMAGE")
             or labels.get("org.opencontainers.image.ref.name"))
    runtime = ("apptainer" if Path("/.singularity.d").exists()
               else "docker" if Path("/.dockerenv").exists()
               else "podman" if Path("/run/.containerenv").exists() else None)
    out = {"image_digest": digest or None, "image": image or None, "runtime": runtime}
    revision = labels.get("org.opencontainers.image.revision")
    if revision:
        out["image_revision"] = revision
    return out


def collect(device: str | None = None, root: str | Path | None = None) -> dict:
    """The environment producing an output now. Fast: a few git calls, cached versions.
    ``code`` is the git state of `root` (default: the current directory); ``package`` is
    the code that actually runs (``package_source()``)."""
    return {
        "code": code_version(root),
        "package": dict(package_source()),
        "packages": dict(package_versions()),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count()},
        "device": device_info(device),
        "container": container_info(),
        "created": utc_now(),
    }


# -- a figure's record ---------------------------------------------------------------

def rel_path(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root` in POSIX form (as dvc.lock, Snakemake and the figure's
    record write paths); outside `root`, its absolute resolved form."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(resolved)


def figure_provenance(runs: Iterable, config: dict | None, figure: str,
                      root: str | Path | None = None) -> dict:
    """Everything needed to say what made `figure` and to check it later.

    `runs` are ``rankbias.store.results.Run`` objects; `config` is the figure's own config
    section (its ``rank`` entry, if any, names the normalisation and tolerance).
    """

    root = Path(root) if root is not None else Path.cwd()
    config = dict(config or {})
    rank_cfg = config.get("rank") or {}
    records: list[dict] = []
    datasets: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r.path.name):
        info = run.info
        prov = info.get("provenance") or {}
        records.append({
            "run_id": info.get("run_id"),
            "path": rel_path(run.path, root),
            "spec": info.get("spec"),
            "model": info.get("model"),
            "pack_id": info.get("pack_id"),
            "status": info.get("status"),
            "diverged": info.get("diverged"),
            "epochs_completed": info.get("epochs_completed"),
            "wall_time_s": info.get("wall_time_s"),
            "device": info.get("device"),
            "seeds": info.get("seeds"),
            "dataset": info.get("dataset") or prov.get("dataset"),
            "files": dict(info.get("files") or {}),
            "run_json_sha256": sha256_file(run.path / "run.json"),
            "provenance": prov,
        })
        ds = info.get("dataset") or prov.get("dataset")
        if isinstance(ds, dict) and ds.get("name"):
            datasets.setdefault(ds["name"], {"checksums": ds.get("checksums"),
                                             "source": ds.get("source")})
    return {
        "schema": SCHEMA,
        "figure": figure,
        "runs": records,
        "datasets": datasets,
        "rank": {"measure": rank_cfg.get("measure", M.DEFAULT_MEASURE),
                 "normalise": rank_cfg.get("normalise", M.DEFAULT_NORMALISE),
                 "tol": rank_cfg.get("tol", M.DEFAULT_TOL),
                 "conv": rank_cfg.get("conv", M.DEFAULT_CONV)},
        "config": config,
        "environment": collect(root=root),
    }


def _json(provenance: dict) -> str:
    # ASCII only: it fits a PNG tEXt/zTXt chunk and a plain PDF literal string.
    return json.dumps(provenance, sort_keys=True, separators=(",", ":"), default=str,
                      ensure_ascii=True)


def sidecar_path(figure_path: str | Path) -> Path:
    p = Path(figure_path)
    return p.with_name(p.stem + ".provenance.json")


def save_figure(fig, png_path: str | Path, pdf_path: str | Path | None, provenance: dict,
                dpi: int = 150) -> None:
    """Write the figure as PNG (and PDF) with `provenance` embedded, the sidecar
    ``<stem>.provenance.json`` beside the PNG and the page rendered from it
    (``provenance_page``). Each file is written atomically."""
    from PIL.PngImagePlugin import PngInfo
    import matplotlib


    text = _json(provenance)
    # Round-trip now so the sidecar holds exactly what the images hold.
    record = json.loads(text)
    info = PngInfo()
    info.add_text("Software", f"rankbias via Matplotlib {matplotlib.__version__}")
    info.add_text(PNG_KEY, text, zip=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"pnginfo": info})
    atomic_write_bytes(png_path, buf.getvalue())
    if pdf_path is not None:
        buf = io.BytesIO()
        meta = {"Title": f"rankbias {provenance.get('figure', '')}".strip(),
                "Subject": f"Provenance JSON in the info dictionary key /{PDF_KEY}",
                "Keywords": " ".join(r.get("run_id") or "" for r in record.get("runs", [])),
                PDF_KEY: text}
        with warnings.catch_warnings():
            # A custom info key is valid PDF; Matplotlib warns about any key it does not know.
            warnings.filterwarnings("ignore", message="Unknown infodict keyword")
            fig.savefig(buf, format="pdf", metadata=meta)
        atomic_write_bytes(pdf_path, buf.getvalue())
    atomic_write_json(sidecar_path(png_path), record)
    atomic_write_bytes(page_path(png_path), page_bytes(record))


def record_bytes(outputs: Mapping[str, bytes], provenance: dict) -> bytes:
    """The provenance sidecar of outputs that cannot embed a record (the claims' Markdown
    and JSON, name -> content): `provenance` plus the sha256 of each output, so the
    record names the exact bytes it describes. The caller writes it beside the first
    output (sidecar_path), in one set with them."""

    sums = {name: hashlib.sha256(data).hexdigest() for name, data in outputs.items()}
    return json_bytes(json.loads(_json({**provenance, "outputs": sums})))


# -- reading an embedded record back -------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_text(data: bytes) -> dict[str, str]:
    if not data.startswith(_PNG_SIG):
        raise ProvenanceError("not a PNG file")
    out, pos = {}, len(_PNG_SIG)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype == b"tEXt":
            k, _, v = body.partition(b"\0")
            out[k.decode("latin-1")] = v.decode("latin-1")
        elif ctype == b"zTXt":
            k, _, rest = body.partition(b"\0")
            out[k.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        elif ctype == b"iTXt":
            k, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            out[k.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
        elif ctype == b"IEND":
            break
    return out


_PDF_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
                ord("f"): b"\f", ord("("): b"(", ord(")"): b")", ord("\\"): b"\\"}


def _pdf_literal(data: bytes, start: int) -> bytes:
    """Decode the PDF literal string whose opening '(' is at data[start]."""
    out, depth, i = bytearray(), 1, start + 1
    while i < len(data):
        c = data[i]
        if c == 0x5C:  # backslash
            n = data[i + 1]
            if n in _PDF_ESCAPES:
                out += _PDF_ESCAPES[n]
                i += 2
            elif 0x30 <= n <= 0x37:
                m = re.match(rb"[0-7]{1,3}", data[i + 1:i + 4])
                assert m is not None  # data[i + 1] is an octal digit
                out.append(int(m.group(), 8) & 0xFF)
                i += 1 + len(m.group())
            elif n in (0x0A, 0x0D):  # line continuation
                i += 3 if data[i + 1:i + 3] == b"\r\n" else 2
            else:
                out.append(n)
                i += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out)
        out.append(c)
        i += 1
    raise ProvenanceError("unterminated string in the PDF info dictionary")


def _pdf_text(data: bytes, key: str) -> str | None:
    if not data.startswith(b"%PDF"):
        raise ProvenanceError("not a PDF file")
    # The last occurrence wins, as an incremental update would.
    matches = list(re.finditer(rb"/" + re.escape(key.encode()) + rb"\s*([(<])", data))
    m = matches[-1] if matches else None
    if m is None:
        return None
    if m.group(1) == b"(":
        raw = _pdf_literal(data, m.start(1))
    else:
        end = data.index(b">", m.start(1))
        raw = bytes.fromhex(re.sub(rb"\s", b"", data[m.start(1) + 1:end]).decode())
    if raw.startswith(b"\xfe\xff"):
        return raw[2:].decode("utf-16-be")
    return raw.decode("latin-1")


def read_embedded(path: str | Path) -> dict:
    """The provenance record embedded in a PNG or PDF written by ``save_figure``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such figure")
    data = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            text = _png_text(data).get(PNG_KEY)
            where = f"PNG text chunk {PNG_KEY!r}"
        elif suffix == ".pdf":
            text = _pdf_text(data, PDF_KEY)
            where = f"PDF info key /{PDF_KEY}"
        else:
            raise ProvenanceError(f"expected a .png or .pdf figure, got {suffix or 'no suffix'!r}")
        if text is None:
            raise ProvenanceError(f"no {where} (not written by rankbias, or stripped)")
        return json.loads(text)
    except ProvenanceError as e:
        raise ProvenanceError(f"{path}: {e}") from None
    except (ValueError, IndexError, zlib.error) as e:
        raise ProvenanceError(f"{path}: embedded provenance is unreadable ({e})") from None


def read_sidecar(figure_path: str | Path) -> dict:
    """The record in the figure's sidecar ``<stem>.provenance.json``.

    Raises FileNotFoundError when the sidecar is missing and ProvenanceError (with
    ``detail``) when it is not a JSON object."""
    p = sidecar_path(figure_path)
    try:
        record = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: provenance sidecar missing") from None
    except ValueError as e:  # a JSONDecodeError or a UnicodeDecodeError
        raise ProvenanceError(f"{p}: not valid JSON ({e})", detail=f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        detail = f"not a JSON object (a {type(record).__name__})"
        raise ProvenanceError(f"{p}: {detail}", detail=detail)
    return record
