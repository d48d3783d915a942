"""Shared test set-up: deterministic seeds and a quiet, small thread pool on the 2-core CI machines."""
import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
