"""The datasets rankbias knows and the files each one is: names, the md5 of every file's
uncompressed bytes, and the files `rankbias data fetch` stores. Torch-free: the workflow
reads `dataset_files()` on every parse (loading them is `rankbias.train.data`'s job).
"""
from __future__ import annotations

from rankbias.core.spec import DATASETS


# md5 of the UNCOMPRESSED files: the widely published values (torchvision's CIFAR10
# class lists the CIFAR-10 ones; gz wrappers differ between mirrors, contents do not).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


class DataError(RuntimeError):
    """A dataset cannot be provided: unknown name, missing file, checksum mismatch."""


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def dataset_files(name: str) -> list[str]:
    """The files ``fetch`` stores in ``<dest>/<name>/`` and training reads: the
    uncompressed dataset files, or for the generated synthetic set its manifest, which
    pins the generated tensors' checksum."""
    check_name(name)
    return sorted(expected_md5(name)) or ["manifest.json"]


def expected_md5(name: str) -> dict[str, str]:
    """The md5 table a dataset's files are checked against (looked up at call time)."""
    check_name(name)
    tables = {"mnist": MNIST_MD5, "fashion_mnist": FASHION_MNIST_MD5, "cifar10": CIFAR10_MD5}
    return dict(tables.get(name, {}))
