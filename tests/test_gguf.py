"""The ``gguf`` backend: ggml's own codes (bit-identical), GGUF's byte formula, the shape rules
ggml does not check, the loaders' arithmetic, and the importance matrix."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

pytest.importorskip("ggml")
gguf = pytest.importorskip("gguf")

from autoquant import AutoquantError, config_from_dict  # noqa: E402
from autoquant.backends import get_backend, quantize_layer  # noqa: E402
from autoquant.backends._hessians import observe  # noqa: E402
from autoquant.backends.gguf import TYPES, check_types, quantize_rows  # noqa: E402
from autoquant.backends.measure import measured_bytes  # noqa: E402

CPU = torch.device("cpu")


def _ggml_direct(w: np.ndarray, type_name: str, imatrix=None) -> np.ndarray:
    """One ggml_quantize_chunk call over every row: the reference codes."""
    import ggml

    type_id = TYPES[type_name][0]
    rows, n = w.shape
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros(ggml.ggml_row_size(type_id, n) * rows, dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    ggml.ggml_quantize_chunk(type_id, w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             out.ctypes.data_as(ctypes.c_void_p), 0, rows, n,
                             None if imat is None else imat.ctypes.data_as(
                                 ctypes.POINTER(ctypes.c_float)))
    return out.reshape(rows, -1)


def test_the_type_table_is_gguf_pys():
    check_types()
    for name, (_, weights, nbytes) in TYPES.items():
        import ggml

        type_id = TYPES[name][0]
        assert ggml.ggml_blck_size(type_id) == weights and ggml.ggml_type_size(type_id) == nbytes


@pytest.mark.parametrize("type_name", list(TYPES))
def test_codes_are_bit_identical_to_ggml_and_bytes_match_the_formula(type_name):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 200, bias=True).to(torch.bfloat16).requires_grad_(False)  # 4 chunks
    cfg = config_from_dict({"method": "gguf", "type": type_name})
    q = quantize_layer(lin, cfg, CPU)
    ours = q.weight.as_tensor().numpy()
    assert np.array_equal(ours, _ggml_direct(lin.weight.float().numpy(), type_name))
    backend = get_backend("gguf")
    weights, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    assert backend.nbytes(cfg, 200, 512, True, torch.bfloat16) == measured_bytes(q) == \
        200 * 512 // weights * nbytes + 200 * 2
    # the loaders' arithmetic: diffusers' dequantization, within gguf-py's numpy reference
    ref = torch.from_numpy(gguf.dequantize(ours, gguf.GGMLQuantizationType[type_name]))
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    mine = dequantize_gguf_tensor(q.weight).float()
    assert torch.allclose(mine, ref, rtol=1e-2, atol=1e-3)
    rel = ((ref - lin.weight.float()).norm() / lin.weight.float().norm()).item()
    assert rel < {"Q2_K": 0.3, "Q3_K": 0.16}.get(type_name, 0.08)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, mine.to(torch.bfloat16), lin.bias)
    assert torch.equal(q(x), expected)


def test_threads_do_not_change_the_codes():
    w = np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32)
    one = quantize_rows(w, "Q4_K", threads=1)
    assert np.array_equal(one, quantize_rows(w, "Q4_K", threads=3))


def test_shapes_ggml_would_garble_are_refused_before_it_runs():
    backend = get_backend("gguf")
    k = config_from_dict({"method": "gguf", "type": "Q4_K"})
    legacy = config_from_dict({"method": "gguf", "type": "Q4_0"})
    assert "multiple of 256" in backend.layer_reason(k, 64, 96, torch.bfloat16)
    assert backend.layer_reason(legacy, 64, 96, torch.bfloat16) is None  # 96 = 3 x 32
    assert "multiple of 32" in backend.layer_reason(legacy, 64, 80, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_rows(np.zeros((4, 96), np.float32), "Q4_K")
    with pytest.raises(AutoquantError, match="choose one of"):
        config_from_dict({"method": "gguf", "type": "Q9_9"})


def test_an_importance_matrix_cuts_the_weighted_error_and_changes_only_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 64, bias=False).requires_grad_(False)
    scale = torch.ones(512)
    scale[:32] = 30.0  # a few input channels carry most of the signal, as in real layers
    x = torch.randn(2048, 512) * scale
    observe(lin, x)
    errors = {}
    for imatrix in (False, True):
        cfg = config_from_dict({"method": "gguf", "type": "Q3_K", "imatrix": imatrix})
        q = quantize_layer(lin, cfg, CPU)
        assert q.weight.dtype == torch.uint8 and q.weight.quant_type == TYPES["Q3_K"][0]
        with torch.no_grad():
            errors[imatrix] = (q(x) - lin(x)).pow(2).mean().item()
    assert errors[True] < 0.9 * errors[False]


def test_an_imatrix_config_without_calibration_says_what_to_do():
    lin = torch.nn.Linear(256, 32)
    cfg = config_from_dict({"method": "gguf", "type": "Q4_K", "imatrix": True})
    assert get_backend("gguf").needs_calibration(cfg)
    assert not get_backend("gguf").needs_calibration(
        config_from_dict({"method": "gguf", "type": "Q4_K"}))
    with pytest.raises(AutoquantError, match="calibrate"):
        quantize_layer(lin, cfg, CPU)
