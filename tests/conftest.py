import os

# Tests never touch the network: a hub lookup must fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test session gets its own $AUTOQUANT_CACHE: tests neither read nor fill the user's
    cache (references, HIGGS grids, the demo folder)."""
    path = tmp_path_factory.mktemp("autoquant-cache")
    old = os.environ.get("AUTOQUANT_CACHE")
    os.environ["AUTOQUANT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("AUTOQUANT_CACHE", None)
    else:
        os.environ["AUTOQUANT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_flux_factory():
    from autoquant.models.pipelines import load_pipeline

    return lambda: load_pipeline("tiny-flux", dtype="auto")


@pytest.fixture(scope="session")
def tiny_sd_factory():
    from autoquant.models.pipelines import load_pipeline

    return lambda: load_pipeline("tiny-sd", dtype="auto")
