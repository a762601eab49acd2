import pytest
import torch

# The test problems are tiny: one thread is faster than two (no sync overhead) and deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption("--cluster", action="store_true", default=False,
                     help="also run the two-node Ray cluster tests (tests/test_ray_cluster.py, ~2 min)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--cluster"):
        return
    skip = pytest.mark.skip(reason="two-node Ray cluster test: run with --cluster")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _check_figure_layout():
    """Every figure a test saves through ``plotting.savefig`` (the experiments, the commands) is
    checked: its legends and texts inside the canvas (ValueError otherwise)."""
    from hgtoolkit import plotting
    plotting.CHECK_LAYOUT = True
    yield
    plotting.CHECK_LAYOUT = False
