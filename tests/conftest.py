import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Kernel measurements (`ling.kernels.probe`) go to a cache of this test session, never
    the user's: each session measures on the machine it runs on."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LING_CACHE", str(tmp_path_factory.mktemp("ling-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and default dtype."""
    torch.manual_seed(0)
    yield
