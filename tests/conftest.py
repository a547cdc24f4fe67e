import os

# Tests never touch the network: a hub lookup must fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def devices():
    """CPU always; CUDA only under the gpu marker (run through the device tool)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session")
def tiny_flux_factory():
    from autoquant.pipelines import load_pipeline

    return lambda: load_pipeline("tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd_factory():
    from autoquant.pipelines import load_pipeline

    return lambda: load_pipeline("tiny-sd")


def generate(pipe, seed=0, steps=2, prompt="a photo of a red cat"):
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images
