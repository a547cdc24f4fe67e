"""Applying recipes to real (tiny) diffusers pipelines: summary, all-or-nothing, save/reload."""

from __future__ import annotations

import pytest
import torch

import autoquant
from autoquant import AutoquantError, BackendUnavailableError, Recipe, RecipeError
from autoquant.backends.measure import measured_bytes
from autoquant.backends import get_backend
from autoquant.models.inventory import components_of

from .helpers import assert_same, generate, snapshot

MIXED = {
    "format": "autoquant-recipe/1",
    "components": ["transformer"],
    "default": {"method": "hqq", "bits": 4, "group_size": 64},
    "layers": {
        "re:transformer\\.single_transformer_blocks\\.\\d+\\.proj_out": {"method": "bnb", "bits": 4},
        "transformer.transformer_blocks.0.ff.net.2": {"method": "torchao", "type": "intx",
                                                       "bits": 3},
        "transformer.transformer_blocks.1.ff.net.2": {"method": "bnb", "bits": 8},
        "transformer.transformer_blocks.1.attn.to_out.0": {"method": "torchao", "type": "fp8"},
        "transformer.proj_out": {"method": "none"},
    },
}


def test_mixed_recipe_on_flux_like_pipeline(tiny_flux_factory):
    pipe = tiny_flux_factory()
    ref = generate(pipe)
    summary = autoquant.apply_recipe(pipe, Recipe.from_dict(MIXED), progress=False)
    comp = pipe.transformer
    assert type(comp.transformer_blocks[0].attn.to_q).__name__ == "HQQLinear"
    assert type(comp.single_transformer_blocks[0].proj_out).__name__ == "Linear4bit"
    assert type(comp.transformer_blocks[1].ff.net[2]).__name__ == "Linear8bitLt"
    assert type(comp.transformer_blocks[0].ff.net[2].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(comp.proj_out) is torch.nn.Linear
    assert summary.per_method["bnb4-nf4"] == 2 and summary.per_method["none"] == 1
    assert summary.bytes_after == summary.predicted_bytes_after  # formulas are exact
    assert summary.bytes_after < summary.bytes_before / 2
    assert summary.skipped == {"transformer.x_embedder":
                               "hqq4-g64: in_features=16 is not divisible by group_size=64"}
    assert 0 < summary.fp_share < 0.05  # proj_out + x_embedder
    assert summary.component_bytes_after["transformer"] == measured_bytes(pipe.transformer)
    assert summary.component_bytes_after["vae"] == summary.component_bytes_before["vae"]
    out = generate(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < (out.float() - ref.float()).abs().max() < 0.5


def test_unet_pipeline_uniform_default(tiny_sd_factory):
    pipe = tiny_sd_factory()
    recipe = Recipe.from_dict({"format": "autoquant-recipe/1", "components": ["unet"],
                               "default": {"method": "torchao", "type": "int8"}})
    ref = generate(pipe)
    summary = autoquant.apply_recipe(pipe, recipe, progress=False)
    assert summary.layers_quantized == 50 and summary.fp_share == 0
    assert summary.bytes_after == summary.predicted_bytes_after
    assert 8 < summary.bits_per_weight < 9
    out = generate(pipe)
    assert (out.float() - ref.float()).abs().mean() < 0.05


def test_failure_midway_leaves_the_pipeline_exactly_as_it_was(tiny_flux_factory, monkeypatch):
    pipe = tiny_flux_factory()
    before = snapshot(pipe)
    backend = get_backend("hqq")
    real = backend.quantize
    calls = {"n": 0}

    def flaky(linear, cfg, device):
        calls["n"] += 1
        if calls["n"] == 20:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(linear, cfg, device)

    monkeypatch.setattr(backend, "quantize", flaky)
    with pytest.raises(AutoquantError, match="simulated out of memory.*Nothing was changed"):
        autoquant.apply_recipe(pipe, Recipe.from_dict(MIXED), progress=False)
    assert calls["n"] == 20
    assert_same(before, snapshot(pipe))
    assert autoquant.applied_state(pipe) is None


def test_invalid_recipe_touches_nothing(tiny_flux_factory):
    pipe = tiny_flux_factory()
    before = snapshot(pipe)
    bad = dict(MIXED, layers={**MIXED["layers"], "transformer.nope": {"method": "hqq", "bits": 4}})
    with pytest.raises(RecipeError, match="transformer.nope: no such quantizable layer"):
        autoquant.apply_recipe(pipe, Recipe.from_dict(bad), progress=False)
    assert_same(before, snapshot(pipe))


def test_method_that_cannot_run_here_fails_before_anything_changes(tiny_flux_factory):
    pipe = tiny_flux_factory()
    before = snapshot(pipe)
    recipe = Recipe.from_dict({"format": "autoquant-recipe/1", "components": ["transformer"],
                               "default": {"method": "hqq", "bits": 4},
                               "layers": {"transformer.proj_out": {"method": "torchao",
                                                                   "type": "fp8_dynamic"}}})
    with pytest.raises(BackendUnavailableError, match="torchao-fp8_dynamic on cpu: .*CUDA"):
        autoquant.apply_recipe(pipe, recipe, progress=False)
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("factory", ["tiny_flux_factory", "tiny_sd_factory"])
def test_save_and_load_quantized_pipeline_gives_identical_images(factory, request, tmp_path):
    pipe = request.getfixturevalue(factory)()
    comp = "transformer" if factory == "tiny_flux_factory" else "unet"
    recipe = Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": [comp],
        "default": {"method": "hqq", "bits": 3},
        "layers": {f"re:{comp}\\..*ff\\.net\\.0\\.proj": {"method": "bnb", "bits": 4,
                                                          "double_quant": True},
                   f"re:{comp}\\..*attn\\w*\\.to_v": {"method": "torchao", "type": "int8"},
                   f"re:{comp}\\..*attn\\w*\\.to_k": {"method": "bnb", "bits": 8}}})
    autoquant.apply_recipe(pipe, recipe, progress=False)
    images = generate(pipe)
    autoquant.save_quantized(pipe, tmp_path / "q")
    saved = autoquant.load_recipe(tmp_path / "q" / "recipe.yaml")
    assert saved.model["fingerprint"].startswith("sha256:")
    again = autoquant.load_quantized(tmp_path / "q")  # rebuilds the base from the recipe's model id
    assert torch.equal(generate(again), images)
    assert measured_bytes(getattr(again, comp)) == measured_bytes(getattr(pipe, comp))


def test_save_refuses_an_unquantized_pipeline(tiny_sd_factory, tmp_path):
    with pytest.raises(AutoquantError, match="apply a recipe first"):
        autoquant.save_quantized(tiny_sd_factory(), tmp_path)


def test_plain_module_uses_its_own_paths():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    recipe = Recipe.from_dict({"format": "autoquant-recipe/1",
                               "layers": {"0": {"method": "hqq", "bits": 8},
                                          "2": {"method": "bnb", "bits": 4}}})
    x = torch.randn(3, 64)
    ref = model(x)
    summary = autoquant.apply_recipe(model, recipe, progress=False)
    assert summary.layers_quantized == 2
    assert ((model(x) - ref).norm() / ref.norm()) < 0.15


@pytest.mark.gpu
def test_apply_onto_the_gpu_layer_by_layer(tiny_flux_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pipe = tiny_flux_factory()  # weights on the CPU
    summary = autoquant.apply_recipe(pipe, Recipe.from_dict(MIXED), device="cuda", progress=False)
    assert summary.bytes_after == summary.predicted_bytes_after
    for comp in components_of(pipe).values():
        assert measured_bytes(comp, "cpu") == 0, "everything moved to the GPU"
    hqq = pipe.transformer.transformer_blocks[0].attn.to_q
    assert hqq.W_q.is_cuda and hqq.meta["scale"].is_cuda
    images = generate(pipe)
    assert images.is_cuda and torch.isfinite(images).all()


def test_component_bytes_are_what_the_formulas_say_for_every_method(tiny_flux_factory):
    """Per-layer formulas must add up to the component's measured bytes: no storage shared
    between layers that a formula counts per layer (HIGGS grids once were)."""
    for entry in ({"method": "higgs", "bits": 2, "p": 2, "group_size": 16},
                  {"method": "hqq", "bits": 3, "group_size": 16},
                  {"method": "bnb", "bits": 4, "double_quant": True},
                  {"method": "torchao", "type": "intx", "bits": 4, "group_size": 16}):
        pipe = tiny_flux_factory()
        summary = autoquant.apply_recipe(pipe, Recipe.from_dict(
            {"format": "autoquant-recipe/1", "components": ["transformer"], "default": entry}),
            progress=False)
        assert summary.component_bytes_after["transformer"] == measured_bytes(pipe.transformer)
        assert summary.bytes_after == summary.predicted_bytes_after, entry


def test_a_failed_move_to_the_device_puts_every_layer_back(tiny_flux_factory, monkeypatch):
    pipe = tiny_flux_factory()
    before = snapshot(pipe)

    def refuse(*a, **k):
        raise RuntimeError("simulated: the device is full")

    monkeypatch.setattr(pipe.vae, "to", refuse)
    with pytest.raises(RuntimeError, match="device is full"):
        autoquant.apply_recipe(pipe, Recipe.from_dict(MIXED), device="cpu", progress=False)
    monkeypatch.undo()
    assert_same(before, snapshot(pipe))
    assert autoquant.applied_state(pipe) is None


def test_load_quantized_refuses_what_is_not_a_saved_pipeline(tiny_sd_factory, tmp_path):
    with pytest.raises(AutoquantError, match="is not a saved autoquant pipeline"):
        autoquant.load_quantized(tmp_path)
    pipe = tiny_sd_factory()
    autoquant.apply_recipe(pipe, Recipe.from_dict({"format": "autoquant-recipe/1",
                                                   "components": ["unet"],
                                                   "default": {"method": "hqq", "bits": 4}}),
                           progress=False)
    autoquant.save_quantized(pipe, tmp_path / "q")
    with pytest.raises(AutoquantError, match="fingerprint"):
        autoquant.load_quantized(tmp_path / "q", base=autoquant.load_pipeline("tiny-flux"))
