"""gptq: calibrated rounding stored as hqq stores it -- better outputs at the same bytes, and no
quantization without calibration data (search and apply collect it themselves)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import autoquant
from autoquant.generation import calibration
from autoquant.backends.measure import measured_bytes
from autoquant.backends import config_from_dict, quantize_layer
from autoquant.backends.gptq import gptq_codes, hqq_grid

CPU = torch.device("cpu")


def _correlated(rows=256, n=512, seed=0):
    """Inputs whose channels are correlated and unevenly scaled, as a denoiser's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.rand(n, generator=g) ** 3
    return (torch.randn(rows, n, generator=g) @ mix).to(torch.bfloat16)


def _layer(out=192, n=512):
    torch.manual_seed(0)
    return nn.Linear(n, out, dtype=torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_hqq_on_its_calibration_inputs_at_the_same_bytes(bits):
    lin, x = _layer(), _correlated()
    calibration.observe(lin, x)
    g = quantize_layer(lin, config_from_dict({"method": "gptq", "bits": bits}), CPU)
    h = quantize_layer(lin, config_from_dict({"method": "hqq", "bits": bits}), CPU)
    with torch.no_grad():
        ref = lin(x).float()
        err = {k: ((m(x).float() - ref).norm() / ref.norm()).item() for k, m in
               (("gptq", g), ("hqq", h))}
    assert measured_bytes(g) == measured_bytes(h)
    assert type(g) is type(h)  # hqq's module and kernels
    assert err["gptq"] < 0.8 * err["hqq"], err


def test_the_stored_layer_dequantizes_to_what_gptq_computed():
    lin, x = _layer(), _correlated()
    calibration.observe(lin, x)
    for bits in (2, 3, 4, 8):
        q = quantize_layer(lin, config_from_dict({"method": "gptq", "bits": bits}), CPU)
        scale, zero = hqq_grid(lin.weight.float(), bits, 64, lin.weight.dtype)
        codes = gptq_codes(lin.weight.float(), calibration.hessian(lin), bits, scale, zero)
        assert int(codes.max()) <= 2 ** bits - 1
        want = ((codes.float().reshape(192, 8, 64) - zero[..., None]) * scale[..., None])
        got = q.dequantize().float().reshape(192, 8, 64)
        # (hqq dequantizes in the layer's dtype, bf16: 8 significant bits)
        assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-5)


def test_an_uncalibrated_layer_is_refused_with_what_to_do():
    lin = _layer()
    with pytest.raises(autoquant.BackendError, match="no calibration data.*autoquant.calibrate"):
        quantize_layer(lin, config_from_dict({"method": "gptq", "bits": 4}), CPU, "the.layer")
    with pytest.raises(ValueError, match="512 x 512"):
        calibration.register(lin, torch.eye(3))


def _gptq_recipe(model="tiny-flux"):
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "model": {"id": model}, "components": ["transformer"],
        "layers": {"re:transformer\\.transformer_blocks\\.0\\.attn\\.to_[qkv]":
                   {"method": "gptq", "bits": 4, "group_size": 16},
                   "re:transformer\\.single_transformer_blocks\\.0\\..*":
                   {"method": "gptq", "bits": 3, "group_size": 16}}})


def test_applying_a_gptq_recipe_calibrates_the_pipeline_first(tiny_flux_factory):
    pipe = tiny_flux_factory()
    block = pipe.transformer.transformer_blocks[0].attn
    q, k, v = block.to_q, block.to_k, block.to_v
    summary = autoquant.apply_recipe(pipe, _gptq_recipe(), progress=False)
    assert summary.per_method["gptq4-g16"] == 3 and summary.layers_quantized >= 4
    assert summary.bytes_after == summary.predicted_bytes_after
    # q, k and v read one input tensor: one Hessian, shared
    assert calibration.hessian(q) is calibration.hessian(k) is calibration.hessian(v)
    h = calibration.hessian(q)
    assert torch.allclose(h, h.T, atol=1e-5) and bool((torch.diag(h) > 0).all())
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "HQQLinear"


def test_a_bare_module_without_calibration_is_refused_and_left_as_it_was(tiny_flux_factory):
    module = tiny_flux_factory().transformer
    before = {k: v.clone() for k, v in module.state_dict().items()}
    recipe = autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1",
        "layers": {"transformer_blocks.0.attn.to_q": {"method": "gptq", "bits": 4,
                                                      "group_size": 16}}})
    with pytest.raises(autoquant.InputError, match="no calibration data.*Nothing was changed"):
        autoquant.apply_recipe(module, recipe, progress=False)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # calibrated by hand, the same module takes the recipe
    lin = module.transformer_blocks[0].attn.to_q
    calibration.observe(lin, torch.randn(64, lin.in_features))
    assert autoquant.apply_recipe(module, recipe, progress=False).layers_quantized == 1


def test_a_search_with_gptq_calibrates_once_and_its_recipe_applies_to_the_same_layers(tmp_path):
    from autoquant.search import Search, SearchConfig, run_search
    from autoquant.generation.settings import EvalSettings
    from autoquant.search.space import SearchSpace

    space = SearchSpace.from_dict({
        "format": "autoquant-space/1", "fp_cap": 0.2,
        "candidates": [{"method": "gptq", "bits": 4, "group_size": 16},
                       {"method": "hqq", "bits": 4, "group_size": 16}, {"method": "none"}]})
    settings = EvalSettings.for_model("tiny-flux", "search", seeds=[3], batch_size=8)
    settings = dataclasses.replace(settings, prompts=settings.prompts[:3])
    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    search = Search(SearchConfig(model="tiny-flux", budget="45%", space=space, trials=3,
                                 out=tmp_path / "out", settings=settings, clip=None,
                                 progress=False, sensitivity="anchored"), pipe)
    run_search(search)
    assert search.timing["calibration_s"] > 0
    recipe = autoquant.load_recipe(tmp_path / "out" / "best.yaml")
    gptq = {n: c for n, c in recipe.layers.items() if c.method == "gptq"}
    assert gptq, "the solver's plans at 45% use gptq (it beats hqq at the same bytes)"
    cal = recipe.provenance["calibration"]
    assert cal["prompts"] == list(settings.prompts) and cal["seeds"] == [3 + 7919]
    # a fresh pipeline calibrates on what the search recorded: the very layers it scored
    name = sorted(gptq)[0]
    fresh = autoquant.load_pipeline("tiny-flux", dtype="auto")
    autoquant.apply_recipe(fresh, recipe, progress=False)
    comp, path = name.split(".", 1)
    got = getattr(fresh, comp).get_submodule(path)
    search.cache.restore()
    want = quantize_layer(
        getattr(pipe, comp).get_submodule(path), gptq[name], torch.device("cpu"))
    assert torch.equal(got.W_q, want.W_q) and torch.equal(got.meta["scale"], want.meta["scale"])


def test_a_recorded_calibration_that_is_not_plain_data_is_refused(tiny_flux_factory):
    recipe = _gptq_recipe()
    recipe.provenance = {"calibration": {"prompts": "a cat", "seeds": [0]}}
    with pytest.raises(autoquant.InputError, match="provenance.calibration"):
        autoquant.apply_recipe(tiny_flux_factory(), recipe, progress=False)
