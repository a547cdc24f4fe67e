"""The Flux demo (``demo-flux``): offline loading, Flux's structure, plain calls, determinism,
trained behaviour, and a short search on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

import autoquant
from autoquant.models.zoo.captions import CLASSES, HOLDOUT_TEMPLATES, captions_for
from autoquant.models.zoo.flux import (DEMO_FLUX_GENERATION, FLUX_DIR, STOCK_FLUX_KWARGS,
                                       demo_flux_folder)


@pytest.fixture(scope="module")
def flux():
    return autoquant.load_pipeline("demo-flux")


def _classify(images: torch.Tensor) -> torch.Tensor:
    from autoquant.models.zoo.models import load_classifier

    with torch.no_grad():
        return load_classifier()(images.float() * 2 - 1).argmax(1)


def test_it_is_a_flux_pipeline_with_flux_blocks_and_k_quant_widths(flux):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    assert isinstance(flux, FluxPipeline) and type(flux).__name__ == "DemoFluxPipeline"
    t = flux.transformer
    assert isinstance(t, FluxTransformer2DModel)
    assert len(t.transformer_blocks) >= 2 and len(t.single_transformer_blocks) >= 2
    assert t.config.num_attention_heads * t.config.attention_head_dim == 256
    assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim
    assert flux.vae.config.latent_channels == 16 and flux.vae.config.shift_factor is not None
    assert flux.scheduler.config.use_dynamic_shifting
    inside = [(n, m) for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert len(inside) >= 30
    assert all(m.in_features % 256 == 0 for _, m in inside), \
        [(n, m.in_features) for n, m in inside if m.in_features % 256]
    # QK-norm and modulation, as Flux has them
    assert any(n.endswith("attn.norm_q") for n, _ in t.named_modules())
    assert any(n.endswith("norm1.linear") for n, _ in t.named_modules())


def test_the_flux_space_applies_unchanged(flux):
    inv = autoquant.inventory(flux)
    space = autoquant.load_space("flux")
    names = {l.name for l in inv}
    for pattern in ("transformer.transformer_blocks.0.attn.to_q",
                    "transformer.transformer_blocks.1.attn.add_k_proj",
                    "transformer.single_transformer_blocks.1.proj_mlp",
                    "transformer.single_transformer_blocks.0.proj_out", "transformer.x_embedder"):
        assert pattern in names  # Flux.1-dev's module names
    baseline = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                           "components": space.components,
                                           "default": {"method": "hqq", "bits": 4}})
    assert baseline.resolve(inv).configs


def test_a_plain_call_makes_a_32px_image_of_the_prompt(flux):
    image = flux("a photo of a sneaker", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_generation_is_deterministic_and_follows_unseen_wordings(flux):
    prompts = [captions_for(c, None, HOLDOUT_TEMPLATES)[0] for c in range(len(CLASSES))]
    run = lambda: flux(prompts, generator=torch.Generator().manual_seed(3),  # noqa: E731
                       output_type="pt").images
    a, b = run(), run()
    assert a.shape == (10, 3, 32, 32) and torch.equal(a, b)
    assert (_classify(a) == torch.arange(10)).float().mean() >= 0.7


def test_stock_flux_pipeline_loads_the_folder_and_makes_the_same_image(flux):
    from diffusers import FluxPipeline

    # the fixture's dtype is --dtype auto's: bfloat16, or float32 on a CPU without native bf16
    stock = FluxPipeline.from_pretrained(demo_flux_folder(), torch_dtype=flux.transformer.dtype)
    assert type(stock) is FluxPipeline
    prompt = "a photo of a bag"
    ours = flux(prompt, generator=torch.Generator().manual_seed(1), output_type="pt").images
    theirs = stock(prompt, generator=torch.Generator().manual_seed(1), output_type="pt",
                   **STOCK_FLUX_KWARGS).images
    assert torch.equal(ours, theirs)
    # height and width alone (the stock defaults otherwise): it still works
    assert stock(prompt, height=32, width=32, num_inference_steps=2,
                 output_type="pt").images.shape == (1, 3, 32, 32)


def test_the_flux_demo_pickles(flux):
    import pickle

    again = pickle.loads(pickle.dumps(flux))
    assert type(again) is type(flux)


def test_shipped_flux_weights_are_bf16_and_small():
    from safetensors import safe_open

    files = sorted(FLUX_DIR.rglob("*.safetensors"))
    assert [f.parent.name for f in files] == ["transformer", "vae"]
    assert sum(f.stat().st_size for f in files) <= 16 * 10**6
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}, f
    log = json.loads((FLUX_DIR / "train_log.json").read_text())
    assert {"vae", "denoiser"} <= set(log) and log["denoiser"]["steps"] > 100


def test_builtin_defaults_are_the_pipelines_own():
    from autoquant.generation.settings import EvalSettings

    s = EvalSettings.for_model("demo-flux", "search")
    assert s.steps == DEMO_FLUX_GENERATION["num_inference_steps"]
    assert s.height == s.width == 32 and len(s.prompts) == 20


def test_every_verb_takes_the_flux_demo(tmp_path, capsys):
    """search (the flux space, unchanged), report, the notebook, baseline, evaluate, apply and
    inspect on ``--model demo-flux``, on the CPU."""
    from autoquant.cli.commands import main

    out = tmp_path / "out"
    assert main(["search", "--model", "demo-flux", "--space", "flux", "--budget", "35%",
                 "--trials", "4", "--seeds", "0", "--sensitivity", "anchored", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 4
    best = autoquant.load_recipe(out / "best.yaml")
    assert best.metrics["bytes"] <= report["budget_bytes"] and best.metrics["psnr"] > 10
    assert best.metrics["clip_fidelity"] > 0  # scored by the demo CLIP
    assert main(["report", "--out", str(out)]) == 0 and (out / "report.html").is_file()
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    from tests.test_explore import NOTEBOOK

    nb = nbformat.read(NOTEBOOK, as_version=4)
    import os

    os.environ["AUTOQUANT_OUT"] = str(out)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["AUTOQUANT_OUT"]
    assert list(tmp_path.glob("trial-*.yaml"))
    capsys.readouterr()
    assert main(["baseline", "--model", "demo-flux", "--method", "hqq", "--bits", "4",
                 "--protect", "default", "--out", str(tmp_path / "hqq4.yaml"), "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "demo-flux", "--recipe", str(tmp_path / "hqq4.yaml"),
                 "--seeds", "1000", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert 10 < scored["metrics"]["psnr"]["mean"] < 60
    assert main(["apply", "--model", "demo-flux", "--recipe", str(out / "best.yaml"),
                 "--prompt", "a photo of a bag", "--out", str(tmp_path / "bag.png")]) == 0
    assert (tmp_path / "bag.png").is_file()
    assert main(["inspect", "--model", "demo-flux", "--totals-only"]) == 0


@pytest.mark.slow
def test_the_flux_training_script_runs_end_to_end_on_a_cpu(tmp_path):
    from autoquant.models.zoo import train_flux
    from autoquant.models.zoo.data import data_dir

    try:
        data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    train_flux.main(["prepare", "--out", str(tmp_path / "text.pt")])
    train_flux.main(["train", "--text-cache", str(tmp_path / "text.pt"), "--out",
                     str(tmp_path / "trained"), "--device", "cpu", "--smoke", "--scale", "0.02"])
    log = json.loads((tmp_path / "trained" / "train_log.json").read_text())
    assert log["vae"]["steps"] >= 1 and log["denoiser"]["steps"] >= 1
    train_flux.main(["install", "--trained", str(tmp_path / "trained"), "--target",
                     str(tmp_path / "installed")])
    assert (tmp_path / "installed" / "scheduler" / "scheduler_config.json").is_file()
