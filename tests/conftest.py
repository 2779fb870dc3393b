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


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need an NVIDIA GPU: without one they are skipped (and listed as
    skipped, with the reason), never silently dropped. `pytest -m cuda` runs only them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False "
                                   "(run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
