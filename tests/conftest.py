import pytest
import torch

# The test problems are tiny: one thread is faster than two (no sync overhead) and deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
