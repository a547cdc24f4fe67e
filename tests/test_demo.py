"""The shipped demo model and CLIP: offline loading, determinism, real (trained) behaviour."""

from __future__ import annotations

import json

import pytest
import torch

import autoquant
from autoquant import AutoquantError
from autoquant.scoring.clip import load_clip
from autoquant.models.zoo import DEMO_DIR, DEMO_GENERATION, demo_folder
from autoquant.models.zoo.captions import CLASSES, HOLDOUT_TEMPLATES, captions_for, class_prompts


@pytest.fixture(scope="module")
def demo():
    return autoquant.load_pipeline("demo")


def _classifier():
    from autoquant.models.zoo.models import load_classifier

    return load_classifier()


def test_plain_diffusers_loads_the_demo_folder_offline():
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel
    from transformers import BertModel

    pipe = DiffusionPipeline.from_pretrained(demo_folder())
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert isinstance(pipe.text_encoder, BertModel)
    linears = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    assert linears >= 60


def test_the_demo_pipeline_pickles_and_is_one_class(demo):
    """Pruna (and multiprocessing) copy a pipeline through pickle: a class defined inside a
    function could not be pickled ("Can't pickle local object")."""
    import pickle

    again = pickle.loads(pickle.dumps(demo))
    assert type(again) is type(demo) is type(autoquant.load_pipeline("demo"))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(demo(["a coat"], generator=gen(), output_type="pt").images,
                       again(["a coat"], generator=gen(), output_type="pt").images)


def test_shipped_weights_are_16_bit_and_small():
    from safetensors import safe_open

    files = list(DEMO_DIR.rglob("*.safetensors"))
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            assert all(st.get_slice(k).get_dtype() in ("F16", "BF16") or
                       not st.get_slice(k).get_dtype().startswith("F") for k in st.keys()), f


def test_generation_is_deterministic_and_follows_unseen_wordings(demo):
    prompts = [captions_for(c, None, HOLDOUT_TEMPLATES)[0] for c in range(len(CLASSES))]
    run = lambda: demo(prompts, generator=torch.Generator().manual_seed(3), output_type="pt",
                       **DEMO_GENERATION).images
    a, b = run(), run()
    assert a.shape == (10, 3, 32, 32)
    assert torch.equal(a, b)
    with torch.no_grad():
        predicted = _classifier()(a.float() * 2 - 1).argmax(1)
    assert (predicted == torch.arange(10)).float().mean() >= 0.8


def test_demo_clip_classifies_fashion_mnist_zero_shot():
    import numpy as np

    # the first 500 Fashion-MNIST test images, shipped so the test needs no Debian package
    data = np.load(__file__.replace("test_demo.py", "data/fmnist_test_500.npz"))
    x, y = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
    images = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1)
    clip = load_clip("demo")
    logits = clip.image_features(images) @ clip.text_features(class_prompts()).T
    assert (logits.argmax(1) == y).float().mean() >= 0.85
    f = clip.image_features(images[:4])
    assert torch.allclose(f.norm(dim=-1), torch.ones(4), atol=1e-4)


def test_clip_specs_that_cannot_load_say_so():
    with pytest.raises(AutoquantError, match="use 'demo', 'ARCH/TAG'"):
        load_clip("nonsense")
    with pytest.raises(AutoquantError, match="unknown open_clip architecture"):
        load_clip("NoSuchArch/foo")
    with pytest.raises(AutoquantError, match="(?s)could not load CLIP ViT-B-32.*--no-clip"):
        load_clip("ViT-B-32/laion2b_s34b_b79k")  # offline in tests: no weights anywhere
    with pytest.raises(AutoquantError, match="name both the architecture and the weights"):
        load_clip("ViT-B-32/")  # open_clip alone would hand back random weights


def test_quantizing_the_demo_denoiser_costs_quality(demo):
    """The demo is a meaningful test of quantization: 2-bit HQQ visibly breaks it."""
    q = autoquant.load_pipeline("demo")
    autoquant.apply_recipe(q, autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "hqq", "bits": 2}}), progress=False)
    kwargs = dict(generator=torch.Generator().manual_seed(0), output_type="pt", **DEMO_GENERATION)
    ref = demo(["a photo of a coat"] * 4, **kwargs).images.float()
    kwargs["generator"] = torch.Generator().manual_seed(0)
    out = q(["a photo of a coat"] * 4, **kwargs).images.float()
    mse = (out - ref).pow(2).mean()
    assert 10 * torch.log10(1 / mse) < 15


@pytest.mark.slow
def test_the_training_script_runs_end_to_end_on_a_cpu(tmp_path):
    """``train_demo`` prepare, train (tiny data, a second per stage) and install, on the CPU."""
    from autoquant.models.zoo import train_demo
    from autoquant.models.zoo.data import data_dir

    try:
        data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    train_demo.main(["prepare", "--out", str(tmp_path / "text.pt")])
    train_demo.main(["train", "--text-cache", str(tmp_path / "text.pt"), "--out",
                     str(tmp_path / "trained"), "--device", "cpu", "--smoke", "--scale", "0.02"])
    log = json.loads((tmp_path / "trained" / "train_log.json").read_text())
    assert {"classifier", "clip", "vae", "denoiser"} <= set(log)
    assert all(log[k]["steps"] >= 1 for k in ("classifier", "clip", "vae", "denoiser"))
    train_demo.main(["install", "--trained", str(tmp_path / "trained"), "--target",
                     str(tmp_path / "installed")])
    assert (tmp_path / "installed" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
