import dataclasses

import pytest
import torch

from rankbias import data


@pytest.fixture(scope="session")
def synthetic():
    return data.load("synthetic", "cpu")


@pytest.fixture(scope="session")
def synthetic64(synthetic):
    """The synthetic set in float64, for exact comparisons of engine and reference."""
    return dataclasses.replace(synthetic, x_train=synthetic.x_train.double(),
                               x_test=synthetic.x_test.double())


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
