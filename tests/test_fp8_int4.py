"""``torchao fp8_int4`` / ``fp8_int4_plain`` (int4 weights x fp8 activations, mslk's kernels)
and the fp8 configs' kernel choice: what can be checked without a GPU. The GPU half is
``tests/test_fp8_int4_gpu.py`` (and the contract suite under ``-m gpu``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autoquant import ConfigError
from autoquant.backends import config_from_dict, get_backend
from autoquant.backends.measure import measured_bytes
from autoquant.backends.torchao import (FP8_INT4_GROUP, Fp8Int4Linear, TorchaoConfig,
                                        _preshuffled_from_state, fp8_aware_int4_codes,
                                        fp8_int4_kernel_values,
                                        _torch_kernels, bf16_preshuffled_class, fp8_rows)

BACKEND = get_backend("torchao")


def test_fp8_int4_configs_are_4_bit_with_no_group_size_to_choose():
    for t in ("fp8_int4", "fp8_int4_plain"):
        cfg = config_from_dict({"method": "torchao", "type": t})
        assert cfg.bits == 4 and cfg.label == f"torchao-{t}"
        with pytest.raises(ConfigError, match="fixed at 128 by mslk"):
            TorchaoConfig(type=t, group_size=64)
        with pytest.raises(ConfigError, match="bits=8 is not supported"):
            TorchaoConfig(type=t, bits=8)


def test_fp8_int4_byte_formulas_count_every_stored_tensor():
    # Flux-dev's MLP up projection, 3072 -> 12288, with a bias
    n, k, bias = 12288, 3072, 12288 * 2
    codes = n * k // 2
    assert BACKEND.nbytes(TorchaoConfig(type="fp8_int4"), n, k, True, torch.bfloat16) == \
        bias + codes + (k // 128) * 8 * n + 4 * n  # fp8 group scales x 8 + fp32 row scales
    assert BACKEND.nbytes(TorchaoConfig(type="fp8_int4_plain"), n, k, True, torch.bfloat16) == \
        bias + codes + (k // 128) * n * 2 * 2  # bf16 scale + bf16 zero point per group
    # both under hqq 4-bit g64's bytes? the plain layout is; the preshuffled one repeats scales
    hqq = get_backend("hqq").nbytes(config_from_dict({"method": "hqq", "bits": 4,
                                                      "group_size": 64}), n, k, True,
                                    torch.bfloat16)
    assert BACKEND.nbytes(TorchaoConfig(type="fp8_int4_plain"), n, k, True,
                          torch.bfloat16) < hqq


@pytest.mark.parametrize("t", ["fp8_int4", "fp8_int4_plain"])
def test_fp8_int4_refuses_layers_its_kernels_cannot_take(t):
    cfg = TorchaoConfig(type=t)
    assert BACKEND.layer_reason(cfg, 3072, 3072, torch.bfloat16) is None
    assert "divisible by its group (128)" in BACKEND.layer_reason(cfg, 3072, 64, torch.bfloat16)
    assert "out_features by 16" in BACKEND.layer_reason(cfg, 72, 256, torch.bfloat16)
    assert "bfloat16" in BACKEND.layer_reason(cfg, 256, 256, torch.float16)


def test_fp8_int4_without_mslk_or_a_gpu_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mslk" else real(name, *a))
    reason = BACKEND.unavailable_reason(TorchaoConfig(type="fp8_int4"), torch.device("cuda"))
    assert "pip install mslk-cuda" in reason
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if importlib.util.find_spec("mslk") is not None:
        assert "CUDA GPU" in BACKEND.unavailable_reason(TorchaoConfig(type="fp8_int4"),
                                                        torch.device("cpu"))


def test_fp8_int4_layers_leave_in_autoquant_folders_only():
    # torchao's safetensors support (what diffusers saves through) refuses preshuffled int4;
    # the plain layout's diffusers round trip is not claimed before it has run on a GPU
    for t in ("fp8_int4", "fp8_int4_plain"):
        assert set(BACKEND.formats(TorchaoConfig(type=t))) == {"autoquant-folder"}
    assert "diffusers" in BACKEND.formats(TorchaoConfig(type="fp8_dynamic"))


def _preshuffled(n=64, k=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 127, (n, k // 2), dtype=torch.int8, generator=gen)
    gs = torch.randn(k // 128, 8, n, generator=gen).to(torch.float8_e4m3fn)
    rs = torch.rand(n, generator=gen)
    return bf16_preshuffled_class()(q, gs, [1, 128], [n, k], None, rs), (q, gs, rs)


def test_the_preshuffled_weight_says_bfloat16_through_every_rebuild():
    """torchao's own class takes its dtype from its fp8 scales, and diffusers' model.dtype
    (the first floating parameter) then read float8: FluxPipeline failed on it."""
    w, _ = _preshuffled()
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (64, 256)
    for rebuilt in (w.detach(), nn.Parameter(w, requires_grad=False), w.to("cpu"), w.clone()):
        assert type(rebuilt).__name__ == "Bf16Int4PreshuffledTensor"
        assert rebuilt.dtype == torch.bfloat16


def test_a_preshuffled_layer_saves_its_tensors_as_held_and_loads_them_back():
    w, (q, gs, rs) = _preshuffled()
    layer = Fp8Int4Linear(256, 64, bias=True, device="meta", dtype=torch.bfloat16)
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.bias = nn.Parameter(torch.arange(64, dtype=torch.bfloat16), requires_grad=False)
    tensors, meta = BACKEND.export_state(layer)
    assert set(tensors) == {"layer.weight.qdata", "layer.weight.group_scale",
                            "layer.weight.row_scale", "layer.bias"}
    assert json.loads(meta["torchao"]) == {"Int4PreshuffledTensor": {"block_size": [1, 128],
                                                                     "shape": [64, 256]}}
    assert measured_bytes(layer) == BACKEND.nbytes(TorchaoConfig(type="fp8_int4"), 64, 256,
                                                   True, torch.bfloat16)
    state = _preshuffled_from_state(tensors, json.loads(meta["torchao"])["Int4PreshuffledTensor"])
    back = state["layer.weight"]
    assert back.dtype == torch.bfloat16 and list(back.block_size) == [1, 128]
    assert torch.equal(back.qdata, q) and torch.equal(back.row_scale, rs)
    assert torch.equal(back.group_scale.view(torch.uint8), gs.view(torch.uint8))
    assert torch.equal(state["layer.bias"], layer.bias)


def test_fp8_rows_is_mslks_row_quantizer():
    """scale = max(|row|, 1/512) / 448, codes = clamp(x / scale, +-448) in e4m3 -- mslk's
    quantize_fp8_row (its Triton kernel; the GPU test compares the two: equal to float rounding)."""
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    x[1] = 0  # the 1/512 floor
    x[2] *= 1e-4
    x[3, 7] = 3e4
    q, scale = fp8_rows(x)
    amax = x.float().abs().amax(1).clamp(min=1 / 512)
    assert torch.equal(scale, amax / 448)
    want = (x.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert q.dtype == torch.float8_e4m3fn and float(q.float().abs().max()) == 448
    assert float(q[1].float().abs().max()) == 0


def test_fp8_metadata_from_before_the_kernel_pin_reads_as_torch_kernels():
    """Folders saved before fp8_dynamic pinned torch's kernels hold kernel_preference AUTO."""
    kp = lambda v: {"_type": "KernelPreference", "_data": v}  # noqa: E731
    old = {"layer.weight": json.dumps({"_type": "Float8Tensor", "_data": {
        "kernel_preference": kp("AUTO"), "act_quant_kwargs": {
            "_type": "QuantizeTensorToFloat8Kwargs", "_data": {"kernel_preference": kp("AUTO")}},
        "block_size": [1, 256]}}), "layer.bias": json.dumps({"_type": "Tensor"}),
        "tensor_names": json.dumps(["layer.weight", "layer.bias"])}
    new = _torch_kernels(old)
    w = json.loads(new["layer.weight"])["_data"]
    assert w["kernel_preference"] == kp("TORCH")
    assert w["act_quant_kwargs"]["_data"]["kernel_preference"] == kp("TORCH")
    assert w["block_size"] == [1, 256]
    assert new["tensor_names"] == old["tensor_names"] and new["layer.bias"] == old["layer.bias"]
    # an explicit MSLK stays what it says
    other = {"layer.weight": json.dumps({"_data": {"kernel_preference": kp("MSLK")}})}
    assert _torch_kernels(other) == {"layer.weight": json.dumps(
        {"_data": {"kernel_preference": kp("MSLK")}})}


def test_fp8_aware_codes_are_the_nearest_of_the_kernels_16_values():
    gen = torch.Generator().manual_seed(0)
    n, k = 16, 2 * FP8_INT4_GROUP
    target = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448)
    target[0, :FP8_INT4_GROUP] = 0  # an all-zero group: zero scale, every code gives 0
    target[1, 5] = 448.0  # the row maximum (e4m3 max): beyond the largest product, code 7
    amax = target.reshape(n, 2, FP8_INT4_GROUP).abs().amax(-1).clamp(min=1e-6)
    scale = (amax / 8).to(torch.float8_e4m3fn)
    codes = fp8_aware_int4_codes(target, scale)
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    # brute force over all 16 codes
    every = torch.stack([fp8_int4_kernel_values(torch.full((n, k), c, dtype=torch.int8), scale)
                         for c in range(-8, 8)])
    best = (every - target).abs().amin(0)
    ours = (fp8_int4_kernel_values(codes, scale) - target).abs()
    torch.testing.assert_close(ours, best, rtol=0, atol=0)
    assert codes[1, 5] == 7
    # mslk's round(target / scale) gives a larger error once the products are rounded (on
    # demo-flux's weights 14% more squared error than these codes)
    rounded = (target / scale.float().repeat_interleave(FP8_INT4_GROUP, 1)).nan_to_num(0)
    rounded = rounded.round().clamp(-8, 7).to(torch.int8)
    theirs = (fp8_int4_kernel_values(rounded, scale) - target).abs()
    assert (ours <= theirs).all()
    assert ours.pow(2).sum() < theirs.pow(2).sum()
    assert (codes != rounded).float().mean() > 0.01
