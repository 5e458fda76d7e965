"""Per-run result files: atomic writers and the reader that figures and claims use.

Layout of ``results/runs/<run_id>/``:
  run.json         spec, run_id, status, divergence, provenance, sha256 of each file,
                   and ``record_sha256``: the sha256 of the canonical JSON of every other
                   field, so that no field can be edited unnoticed
  metrics.parquet  one row per epoch 0..E: epoch, logged, lr, step_loss, train_loss,
                   train_acc, test_loss, test_acc, distance, mean_rank, diverged
  layers.parquet   one row per (epoch, matrix): epoch, layer, index, kind
                   ('hidden' | 'conv' | 'output'), distance, weight_norm
  spectra.npz      'epochs' (logged epochs), 'layers' (names), 'sv_<index>' arrays
                   [n_logged, min(out, in)] of float64 singular values, descending
                   (a convolution's kernel as the matrix [out, in*kh*kw])
  lemmas.parquet   gradient ranks of Lemmas 1-2 on the fresh and trained network
  theory.parquet   Theorem 1 per (logged epoch, matrix, B*), runs with weight decay > 0
                   (rankbias.train.theory describes both)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from zlib import error as zlib_error

import numpy as np
import pandas as pd

from rankbias.store import metrics as M
from rankbias.core.io import (atomic_write_bytes, atomic_write_json, canonical_json, remove_stale_temporaries,
                              sha256_file, utc_now)
from rankbias.core.spec import RunSpec

RUN_FILES = ("metrics.parquet", "layers.parquet", "spectra.npz")
RECORD_HASH = "record_sha256"
# What a run.json that no training job (nor restore, from dvc.lock) wrote is called.
NOT_TRAINED = "not the run.json a training job wrote"
# The temporary files atomic_write_bytes makes: ".<name>.<random>.tmp".
def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)  # numbers only, never a pickle
    return buf.getvalue()


def record_hash(info: dict) -> str:
    """sha256 of a run record's canonical JSON, its own hash field left out."""
    return hashlib.sha256(canonical_json({k: v for k, v in info.items() if k != RECORD_HASH})).hexdigest()


# -- training records: which run.json a training job wrote -------------------------

def ledger_dir(runs_dir: str | Path) -> Path:
    """Where the training records of the runs in `runs_dir` are kept: outside results/,
    ``<repository>/.rankbias/trained/`` for ``<repository>/results/runs`` (for a runs
    directory D elsewhere, ``.rankbias/trained/<D's name>/`` beside it, so two runs
    directories side by side keep their records apart). Not a DVC output and ignored by
    git: it says what was trained, or verified against dvc.lock, in this checkout."""
    runs = Path(os.path.abspath(runs_dir))
    base = runs.parent
    if base.name == "results" and runs.name == "runs":
        return base.parent / ".rankbias" / "trained"
    return base / ".rankbias" / "trained" / runs.name


def ledger_path(run_dir: str | Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return ledger_dir(run_dir.parent) / f"{run_dir.name}.json"


def record_trained(run_dir: str | Path, by: str = "rankbias train") -> None:
    """Record the sha256 of the run.json now in `run_dir` as the one `by` wrote."""
    digest = sha256_file(Path(run_dir) / "run.json")
    atomic_write_json(ledger_path(run_dir), {"run_json_sha256": digest, "by": by, "time": utc_now()})


def trained_sha256(run_dir: str | Path) -> str | None:
    """The sha256 of run.json that the training record of `run_dir` holds; None when there
    is no record (a run trained by an older rankbias, or pulled and not yet restored).
    RunError naming the record when it is unreadable."""
    p = ledger_path(run_dir)
    try:
        digest = json.loads(p.read_text()).get("run_json_sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"{p}: unreadable training record ({e}); expected a JSON object with "
                       f"run_json_sha256") from None
    if not isinstance(digest, str):
        raise RunError(f"{p}: training record without run_json_sha256")
    return digest


def write_run(run_dir: str | Path, run_json: dict, metrics: pd.DataFrame,
              layers: pd.DataFrame, spectra: dict[str, np.ndarray],
              tables: dict[str, pd.DataFrame] | None = None) -> None:
    """Write one run's files (and any further `tables`, file name -> frame); run.json
    goes last and records every file's sha256 and the hash of the whole record, so a
    directory with a run.json is always complete."""
    run_dir = Path(run_dir)
    # Retraining into an existing directory: drop the old run.json first, so a kill
    # between file replacements never leaves a complete-looking run with stale hashes,
    # and the temporaries of an earlier write that was killed.
    (run_dir / "run.json").unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)
    payloads = {"metrics.parquet": parquet_bytes(metrics), "layers.parquet": parquet_bytes(layers),
                "spectra.npz": npz_bytes(spectra)}
    payloads.update({name: parquet_bytes(df) for name, df in (tables or {}).items()})
    for name, data in payloads.items():
        atomic_write_bytes(run_dir / name, data)
    run_json = dict(run_json)
    run_json["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    # Hash the record as it will read back (JSON types), not the Python objects given.
    run_json = json.loads(json.dumps(run_json, default=str))
    run_json[RECORD_HASH] = record_hash(run_json)
    atomic_write_json(run_dir / "run.json", run_json)
    record_trained(run_dir)


# -- reading ---------------------------------------------------------------------

class RunError(RuntimeError):
    pass


@dataclass
class Run:
    """A finished run read back from disk."""
    path: Path

    @cached_property
    def info(self) -> dict:
        p = self.path / "run.json"
        if not p.exists():
            raise RunError(f"{p}: missing; the run did not finish")
        return json.loads(p.read_text())

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @cached_property
    def json_sha256(self) -> str:
        """sha256 of run.json's bytes (read once, however many checks want it)."""
        return sha256_file(self.path / "run.json")

    @cached_property
    def spec(self) -> RunSpec:
        return RunSpec.from_dict(self.info["spec"])

    @property
    def diverged(self) -> bool:
        return self.info.get("diverged") is not None

    def _parquet(self, name: str) -> pd.DataFrame:
        try:
            return pd.read_parquet(self.path / name)
        except (OSError, ValueError) as e:   # pyarrow's ArrowInvalid is a ValueError
            raise RunError(f"{self.path / name}: unreadable ({e})") from None

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return self._parquet("metrics.parquet")

    @cached_property
    def layers(self) -> pd.DataFrame:
        return self._parquet("layers.parquet")

    @cached_property
    def spectra(self) -> dict[str, np.ndarray]:
        p = self.path / "spectra.npz"
        try:
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib_error) as e:
            raise RunError(f"{p}: unreadable ({type(e).__name__}: {e})") from None

    def table(self, name: str) -> pd.DataFrame | None:
        """A further table the run recorded (e.g. theory.parquet), None if it has none."""
        if name not in (self.info.get("files") or {}):
            return None
        return pd.read_parquet(self.path / name)

    @property
    def layer_names(self) -> list[str]:
        return [str(x) for x in self.spectra["layers"]]

    def ranks(self, normalise: str = M.DEFAULT_NORMALISE, tol: float = M.DEFAULT_TOL,
              measure: str = M.DEFAULT_MEASURE) -> pd.DataFrame:
        """Rank of every matrix at every logged epoch: epoch, layer, index, kind, rank, stable_rank.

        `rank` is the paper's count (int; -1 for a spectrum with NaN) with the default
        `measure`, else that convention's rank (float; NaN for a spectrum with NaN)."""
        if measure not in M.MEASURES:
            raise ValueError(f"rank.measure: {measure!r} is not one of {', '.join(M.MEASURES)}")
        sp = self.spectra
        kinds = dict(self.layers.drop_duplicates("index")[["index", "kind"]].itertuples(index=False))
        rows = []
        for i, name in enumerate(self.layer_names):
            sv = sp[f"sv_{i}"]
            r = M.rank(sv, normalise, tol) if measure == "threshold" else M.rank_measure(sv, measure)
            sr = M.stable_rank(sv)
            for e, ri, si in zip(sp["epochs"], r, sr):
                ri = int(ri) if measure == "threshold" else float(ri)
                rows.append((int(e), name, i, kinds.get(i, "hidden"), ri, float(si)))
        return pd.DataFrame(rows, columns=["epoch", "layer", "index", "kind", "rank", "stable_rank"])

    def hidden_ranks(self, normalise: str = M.DEFAULT_NORMALISE, tol: float = M.DEFAULT_TOL,
                     finite_last: bool = True, conv: str = M.DEFAULT_CONV,
                     measure: str = M.DEFAULT_MEASURE) -> tuple[pd.Series, pd.DataFrame]:
        """(mean, final): the average rank over the hidden matrices indexed by logged epoch
        (NaN where a rank is unknown, i.e. once diverged), and the hidden matrices' ranks
        (columns layer, index, rank; sorted by index) at the last logged epoch -- with
        `finite_last`, the last one whose mean is finite (empty when there is none).
        Hidden matrices are the hidden Linear layers and the convolutions, each
        convolution by its kernel's or its operator's spectrum (`conv`); ranks under the
        convention `measure` (rankbias.store.metrics.rank_measure)."""
        if conv not in M.CONV_SPECTRA:
            raise ValueError(f"rank.conv: {conv!r} is not one of {', '.join(M.CONV_SPECTRA)}")
        r = self.ranks(normalise, tol, measure)
        conv_kind = "conv" if conv == "kernel" else "conv_operator"
        if conv == "operator" and (r["kind"] == "conv").any() and not (r["kind"] == conv_kind).any():
            raise RunError(f"{self.path}: rank.conv is 'operator', but this run stores no "
                           "operator spectra of its convolutions")
        hidden = r[r["kind"].isin(("hidden", conv_kind))].copy()
        hidden["rank"] = hidden["rank"].astype(float)
        hidden.loc[hidden["rank"] < 0, "rank"] = np.nan
        mean = hidden.groupby("epoch")["rank"].mean()
        epochs = mean.dropna().index if finite_last else mean.index
        if len(epochs):
            final = hidden[hidden["epoch"] == epochs.max()].sort_values("index")
        else:
            final = hidden.iloc[0:0]
        return mean, final[["layer", "index", "rank"]].reset_index(drop=True)

    def mean_rank(self, normalise: str = M.DEFAULT_NORMALISE, tol: float = M.DEFAULT_TOL,
                  conv: str = M.DEFAULT_CONV) -> pd.Series:
        """Average rank over the hidden matrices, indexed by logged epoch (NaN once diverged)."""
        return self.hidden_ranks(normalise, tol, conv=conv)[0]

    def verify(self) -> list[str]:
        """Problems with this run's record and files (empty when the record's own hash and
        every recorded file hash match)."""
        problems = []
        try:
            info = self.info
        except (RunError, json.JSONDecodeError) as e:
            return [f"{self.path / 'run.json'}: {e}"]
        if not isinstance(info, dict):
            return [f"{self.path / 'run.json'}: not a JSON object"]
        if RECORD_HASH not in info:
            problems.append(f"{self.path / 'run.json'}: no {RECORD_HASH}, so its fields cannot be "
                            f"verified (written by an older rankbias; retrain the run)")
        elif record_hash(info) != info[RECORD_HASH]:
            problems.append(f"{self.path / 'run.json'}: edited after it was written (its fields "
                            f"do not hash to the {RECORD_HASH} it records)")
        else:
            # A consistent rewrite (every hash recomputed) passes the checks above; the
            # training record, kept outside results/, still holds what training wrote.
            try:
                want = trained_sha256(self.path)
            except RunError as e:
                problems.append(f"{self.path / 'run.json'}: {e}")
            else:
                got = self.json_sha256 if want is not None else None
                if want is not None and got != want:
                    problems.append(f"{self.path / 'run.json'}: {NOT_TRAINED} (sha256 {got}; "
                                    f"{ledger_path(self.path)} records {want}): rewritten "
                                    f"outside training")
        try:
            spec = RunSpec.from_dict(info.get("spec", {}))
        except Exception as e:  # noqa: BLE001 - report any spec problem as a finding
            return [f"{self.path / 'run.json'}: invalid spec ({e})"]
        if spec.run_id != info.get("run_id") or self.path.name != spec.run_id:
            problems.append(f"{self.path / 'run.json'}: run_id {info.get('run_id')!r} does not match "
                            f"its spec's hash {spec.run_id!r} or its directory name")
        files = info.get("files")
        if not isinstance(files, dict):
            return problems + [f"{self.path / 'run.json'}: 'files' is not a mapping of name to sha256"]
        for name, digest in files.items():
            p = self.path / name
            if not p.exists():
                problems.append(f"{p}: missing")
            elif sha256_file(p) != digest:
                problems.append(f"{p}: sha256 differs from the one recorded in run.json")
        return problems


class CheckedRun:
    """One run directory, checked once however many figures draw from it: ``Run.verify()``
    (its record and files) and the sha256 of run.json itself."""

    def __init__(self, path: Path):
        self.run = Run(path)
        try:
            self.problems: list[str] = self.run.verify()
        except (ValueError, OSError, AttributeError, TypeError) as e:  # run.json not a record
            self.problems = [f"{path / 'run.json'}: unreadable ({e})"]

    @property
    def path(self) -> Path:
        return self.run.path

    @cached_property
    def info(self) -> dict | None:
        """run.json, or None when it is unreadable (``problems`` then says so)."""
        try:
            info = self.run.info
        except (ValueError, OSError, RunError):
            return None
        return info if isinstance(info, dict) else None

    @cached_property
    def run_json_sha256(self) -> str | None:
        try:
            return self.run.json_sha256
        except OSError:
            return None

    @cached_property
    def bad_files(self) -> set[str]:
        """Names listed in run.json whose file is missing or differs from the sha256 recorded
        there: the files ``verify()`` named. Empty, without reading a file, when verify() was
        clean; only a run that failed it is hashed again, to tell which files failed."""
        if not self.problems or self.info is None:
            return set()
        files = self.info.get("files")
        if not isinstance(files, dict):
            return set()
        return {name for name, digest in files.items()
                if not (self.path / name).is_file() or sha256_file(self.path / name) != digest}


def check_run(d: Path, cache: dict[Path, CheckedRun] | None = None) -> CheckedRun:
    """The check of run directory `d`, made once per `cache` (keyed by resolved path)."""
    if cache is None:
        return CheckedRun(d)
    key = d.resolve()
    if key not in cache:
        cache[key] = CheckedRun(d)
    return cache[key]


def refuse_unverified(runs: list[Run], what: str) -> None:
    """Raise RunError naming every run in `runs` that fails ``verify()``: `what` (a figure,
    the claims) is never made from a record or file that differs from what was trained."""
    failed = []
    for run in runs:
        problems = CheckedRun(run.path).problems
        if problems:
            failed.append(f"{run.path.name} ({'; '.join(problems)})")
    if failed:
        raise RunError(f"{what}: refusing {len(failed)} run(s) that fail verification: "
                       + ", ".join(failed)
                       + ". Run `rankbias restore` to move them aside, then `snakemake` retrains them")


def load_runs(runs_dir: str | Path, run_ids=None) -> list[Run]:
    runs_dir = Path(runs_dir)
    if run_ids is None:
        return [Run(p.parent) for p in sorted(runs_dir.glob("*/run.json"))]
    return [Run(runs_dir / r) for r in run_ids]
