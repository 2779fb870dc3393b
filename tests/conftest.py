import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and default dtype."""
    torch.manual_seed(0)
    yield
