"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch with one thread for a test module: on a busy 2-core machine, OpenMP threads
    waiting for each other make CPU runs erratic (up to 10x slower)."""
    import torch  # here, not at the top: the ETL tests never load torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
