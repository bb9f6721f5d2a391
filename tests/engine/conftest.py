"""One gloo process group for the in-process engine tests."""

import pytest
import torch

from bita.engine.distributed import DistInfo, init_distributed


@pytest.fixture(scope="session")
def dist() -> DistInfo:
    torch.set_num_threads(1)
    return init_distributed("cpu")
