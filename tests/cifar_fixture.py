"""Small CIFAR-10 files in the official python pickle format, for tests.

The real CIFAR-10 cannot be obtained on the test machines, so the loader is tested
on files that have the same layout as ``cifar-10-batches-py``: five ``data_batch_i``
and one ``test_batch`` pickle, each a dict with b'batch_label', b'labels' (list of
int), b'data' (uint8 [n, 3072], rows channel-major R, G, B planes of 32x32) and
b'filenames'; plus ``batches.meta``. Like the real files (written by Python 2), the
keys and byte strings are pickled as Python 2 ``str`` (opcode BINSTRING), so
``pickle.load(f, encoding="bytes")`` gives bytes keys and ``encoding="latin1"`` gives
str keys, exactly as with the originals.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
               b"dog", b"frog", b"horse", b"ship", b"truck"]


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` the way Python 2 pickled ``str``."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar10(folder: str | Path, per_batch: int = 20, n_test: int = 30,
                  seed: int = 0) -> dict:
    """Write a miniature cifar-10-batches-py into ``folder``.

    Returns {'md5': {file: md5}, 'x_train', 'y_train', 'x_test', 'y_test'} with the
    uint8 arrays [n, 3072] and int64 labels in file order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5, xs, ys = {}, [], []
    for i, name in enumerate(TRAIN_BATCHES + ("test_batch",)):
        n = n_test if name == "test_batch" else per_batch
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": (b"testing batch 1 of 1" if name == "test_batch"
                             else f"training batch {i + 1} of 5".encode()),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        blob = py2_pickle(batch)
        (folder / name).write_bytes(blob)
        md5[name] = hashlib.md5(blob).hexdigest()
        xs.append(x)
        ys.append(np.asarray(y, dtype=np.int64))
    meta = py2_pickle({b"num_cases_per_batch": per_batch, b"label_names": LABEL_NAMES,
                       b"num_vis": 3072})
    (folder / "batches.meta").write_bytes(meta)
    return {"md5": md5, "meta_md5": hashlib.md5(meta).hexdigest(),
            "x_train": np.concatenate(xs[:5]), "y_train": np.concatenate(ys[:5]),
            "x_test": xs[5], "y_test": ys[5]}
