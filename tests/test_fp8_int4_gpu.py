"""GPU half of ``torchao fp8_int4`` and of the fp8 configs' kernel choice (``pytest -m gpu``,
through the device tool; fp8_int4 needs mslk-cuda and a Hopper GPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from autoquant.backends import get_backend

BACKEND = get_backend("torchao")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_mslk = pytest.mark.skipif(not HOPPER or importlib.util.find_spec("mslk") is None,
                                reason="fp8_int4 needs mslk-cuda and a Hopper GPU")
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or
                               torch.cuda.get_device_capability() < (8, 9),
                               reason="fp8 needs sm >= 8.9")


def _linear(n=384, k=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    lin.bias.copy_(torch.randn(n, generator=gen) * 0.01)
    return lin.cuda()


def _same_fp8_rows(q, s, mq, ms):
    """Two per-row fp8 quantizations of one tensor agree to float rounding: scales within two
    float32 ulps (mslk divides with ``div_rn``; PyTorch's eager division by a constant multiplies
    by its reciprocal, Triton's ``/`` is approximate), and the codes that round the other way
    (under 1%) one e4m3 step apart."""
    torch.testing.assert_close(s, ms.float(), rtol=2.5e-7, atol=0)
    step = (q.view(torch.uint8).int() - mq.view(torch.uint8).int()).abs()
    assert step.max() <= 1 and (step > 0).float().mean() < 0.01


@pytest.mark.gpu
@needs_mslk
def test_gpu_fp8_rows_matches_mslks_triton_quantizer():
    from mslk.quantize.triton.fp8_quantize import quantize_fp8_row

    from autoquant.backends.torchao import fp8_rows

    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16) * 3
    x[5] = 0
    q, s = fp8_rows(x)
    mq, ms = quantize_fp8_row(x)
    _same_fp8_rows(q, s, mq, ms)
    assert torch.equal(q[5].float(), torch.zeros(3072, device="cuda"))
    qc, sc = torch.compile(fp8_rows)(x)  # fused by Inductor
    _same_fp8_rows(qc, sc, mq, ms)


def _close_outputs(ours, theirs):
    """One layer's outputs from the same weight, whose activations were quantized by two
    quantizers that agree to float rounding: 100x closer than the layer is to bf16 (11%)."""
    diff = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert diff < 1e-3, diff


@pytest.mark.gpu
@needs_mslk
@pytest.mark.parametrize("t,packing", [("fp8_int4", "preshuffled"), ("fp8_int4_plain", "plain")])
def test_gpu_fp8_int4_layer_against_torchaos_own(t, packing):
    """The plain layout: autoquant's layer holds torchao's very weight (same quantizer, same
    codes) and computes what torchao's layer does, with the activation quantizer written in
    PyTorch ops (whose scales differ from mslk's Triton kernel's in the last bit: see
    :func:`_same_fp8_rows`). The preshuffled one: torchao's scales, codes chosen for the
    kernel's rounded products, and so a smaller error than torchao's layer."""
    import torchao.quantization as tq
    from torchao.quantization import quantize_

    from autoquant.backends.torchao import TorchaoConfig

    lin = _linear()
    ours = BACKEND.quantize(lin, TorchaoConfig(type=t), torch.device("cuda"))
    theirs = nn.Linear(512, 384, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    theirs.load_state_dict(lin.state_dict())
    quantize_(theirs, tq.Float8DynamicActivationInt4WeightConfig(int4_packing_format=packing))
    assert ours.weight.dtype == torch.bfloat16
    x = torch.randn(77, 512, device="cuda", dtype=torch.bfloat16)
    if t == "fp8_int4_plain":
        assert torch.equal(ours.weight.qdata, theirs.weight.qdata)
        with torch.no_grad():
            _close_outputs(ours(x), theirs(x))
            _close_outputs(ours(x[:1]), theirs(x[:1]))
        return
    # preshuffled: torchao's scales, codes chosen for the kernel's rounded products
    assert torch.equal(ours.weight.row_scale, theirs.weight.row_scale)
    assert torch.equal(ours.weight.group_scale.view(torch.uint8),
                       theirs.weight.group_scale.view(torch.uint8))
    assert not torch.equal(ours.weight.qdata, theirs.weight.qdata)
    with torch.no_grad():
        ref = lin(x).float()
        err = [((m(x).float() - ref).norm() / ref.norm()).item() for m in (ours, theirs)]
    assert err[0] < err[1], err


@pytest.mark.gpu
@needs_mslk
def test_gpu_the_preshuffled_kernel_multiplies_the_rounded_products_the_codes_were_chosen_for():
    """What :func:`fp8_aware_int4_codes` assumes of mslk's ``f8i4bf16_shuffled``: it computes
    x_fp8 @ (e4m3(code x group scale) x row scale)^T, the products rounded to e4m3."""
    from mslk.quantize.shuffle import int4_row_quantize
    from mslk.quantize.triton.fp8_quantize import quantize_fp8_row

    from autoquant.backends.torchao import (FP8_INT4_GROUP, TorchaoConfig, fp8_aware_int4_codes,
                                            fp8_int4_kernel_values, fp8_rows)

    lin = _linear(n=256, k=1024)
    ours = BACKEND.quantize(lin, TorchaoConfig(type="fp8_int4"), torch.device("cuda"))
    w = lin.weight
    wq, row_scale = quantize_fp8_row(w)
    gs = int4_row_quantize(wq, FP8_INT4_GROUP)[1].to(torch.float8_e4m3fn).t()  # [n, groups]
    codes = fp8_aware_int4_codes(w.float() / row_scale[:, None], gs)
    s = gs.float().repeat_interleave(FP8_INT4_GROUP, dim=1)
    products = fp8_int4_kernel_values(codes, gs)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    xq, xs = fp8_rows(x)
    want = ((xq.float() * xs[:, None]) @ (products * row_scale[:, None]).t() + lin.bias.float())
    unrounded = ((xq.float() * xs[:, None]) @ (codes.float() * s * row_scale[:, None]).t()
                 + lin.bias.float())
    with torch.no_grad():
        got = ours(x).float()
    close = ((got - want).norm() / want.norm()).item()
    assert close < 5e-3, close  # bf16 output rounding
    assert close < ((got - unrounded).norm() / unrounded.norm()).item()


@pytest.mark.gpu
@needs_mslk
def test_gpu_a_flux_transformer_in_fp8_int4_still_says_bfloat16_and_runs():
    """diffusers reads model.dtype from the first floating parameter (Flux: the timestep
    embedder) and FluxPipeline casts its inputs to it."""
    from diffusers import FluxTransformer2DModel

    import autoquant

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1,
                                   num_single_layers=1, attention_head_dim=128,
                                   num_attention_heads=2, joint_attention_dim=256,
                                   pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))
    model = model.to("cuda", torch.bfloat16).requires_grad_(False)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    kw = dict(hidden_states=torch.randn(1, 64, 64, **bf),
              encoder_hidden_states=torch.randn(1, 8, 256, **bf),
              pooled_projections=torch.randn(1, 256, **bf),
              timestep=torch.full((1,), 0.5, **bf), img_ids=torch.zeros(64, 3, device="cuda"),
              txt_ids=torch.zeros(8, 3, device="cuda"))
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0].float()
    summary = autoquant.apply_recipe(model, autoquant.Recipe.from_dict(
        {"format": "autoquant-recipe/1", "default": {"method": "torchao", "type": "fp8_int4"}}),
        device="cuda", progress=False)
    assert summary.layers_quantized > 0 and model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0].float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.5


@pytest.mark.gpu
@needs_fp8
def test_gpu_fp8_dynamic_runs_torchs_kernels_and_loads_folders_saved_before_the_pin():
    """With mslk installed torchao's AUTO would pick mslk's kernels (slower compiled in a Flux
    step); a layer saved with AUTO (autoquant before the pin) still loads, as TORCH."""
    from torchao.quantization.quantize_.common import KernelPreference

    from autoquant.backends.torchao import TorchaoConfig

    cfg = TorchaoConfig(type="fp8_dynamic")
    q = BACKEND.quantize(_linear(), cfg, torch.device("cuda"))
    assert q.weight.kernel_preference == KernelPreference.TORCH
    tensors, meta = BACKEND.export_state(q)
    outer = json.loads(meta["torchao"])
    assert '"TORCH"' in outer["layer.weight"]
    outer["layer.weight"] = outer["layer.weight"].replace('"TORCH"', '"AUTO"')
    old = {"torchao": json.dumps(outer)}
    args = (cfg, 384, 512, True, torch.bfloat16)
    assert BACKEND.state_problems(*args, tensors, old) == []
    back = BACKEND.import_state(*args, tensors, old, torch.device("cuda"))
    assert back.weight.kernel_preference == KernelPreference.TORCH
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
