"""The contract every registered method must honour, for every bit width it supports.

Run on the CPU by default; ``pytest -m gpu`` runs the same suite on CUDA (through the device tool).
"""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoquant.backends.measure import measured_bytes
from autoquant.backends import get_backend, methods

from .helpers import devices

OUT, IN, TOKENS = 192, 512, 32  # divisible by every group size, tile and packing unit in use
DTYPE = torch.bfloat16
# Relative output error allowed at each nominal bit width (random uniform-init weights, normal
# inputs; 1 bit is only required not to diverge) ...
TOLERANCE = {1: 1.1, 2: 0.6, 3: 0.3, 4: 0.15, 5: 0.08, 6: 0.05, 7: 0.03, 8: 0.04, 16: 1e-6}
# ... and the output must still point the reference's way: a layer that outputs zeros (relative
# error 1.0) or noise passes the first bound at 1 bit, never this one.
MIN_COSINE = {1: 0.2, 2: 0.9, 3: 0.97, 4: 0.99, 5: 0.99, 6: 0.99, 7: 0.99, 8: 0.999, 16: 0.99999}

CONFIGS = [cfg for m in methods() for cfg in get_backend(m).configs()]


def _layer_and_input(device, dtype=DTYPE):
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=True).to(dtype).requires_grad_(False)
    x = torch.randn(TOKENS, IN, dtype=dtype)
    return lin.to(device), x.to(device)


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _quantized(cfg, device, dtype=DTYPE):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend = get_backend(cfg.method)
    reason = backend.unavailable_reason(cfg, device) or backend.layer_reason(cfg, OUT, IN, dtype)
    if reason:
        pytest.skip(f"{cfg.label} on {device.type}: {reason}")
    lin, x = _layer_and_input(device, dtype)
    if backend.calibrated:  # (gptq) calibrated on the inputs it is then scored on
        from autoquant.generation.calibration import observe

        observe(lin, x)
    return backend, lin, x, backend.quantize(lin, cfg, device)


_ERRORS: dict = {}


def _error(cfg, device):
    """(relative error, cosine) of the quantized layer's output against the original's."""
    key = (cfg, device)
    if key not in _ERRORS:
        _, lin, x, q = _quantized(cfg, device)
        with torch.no_grad():
            y, ref = q(x).float(), lin(x).float()
        cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
        _ERRORS[key] = (_rel_err(y, ref), cos)
    return _ERRORS[key]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_output_close_to_original(cfg, device):
    err, cos = _error(cfg, device)
    bits = int(cfg.nominal_bits)
    assert err <= TOLERANCE[bits], f"{cfg.label}: relative error {err:.4f}"
    assert cos >= MIN_COSINE[bits], f"{cfg.label}: cosine to the reference {cos:.4f}"


def test_the_bounds_reject_a_layer_that_outputs_zeros():
    ref = torch.randn(TOKENS, OUT)
    zeros = torch.zeros_like(ref)
    assert _rel_err(zeros, ref) <= TOLERANCE[1]  # the error bound alone would pass it
    cos = torch.nn.functional.cosine_similarity(zeros.flatten(), ref.flatten(), dim=0).item()
    assert not cos >= MIN_COSINE[1]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_byte_formula_equals_measured_bytes(cfg, device):
    backend, lin, x, q = _quantized(cfg, device)
    expected = backend.nbytes(cfg, OUT, IN, True, DTYPE)
    assert measured_bytes(q) == expected, "before the first forward"
    with torch.no_grad():
        q(x)
        q(x)
    assert measured_bytes(q) == expected, "after forwards (lazy state, repacking)"
    if cfg.method != "none":
        assert expected < OUT * (IN + 1) * 2, "a quantized layer must be smaller than bf16"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_quantize_leaves_the_original_layer_untouched(cfg, device):
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT).to(DTYPE).requires_grad_(False)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    _, lin2, _, _ = _quantized(cfg, device)  # same seed: same weights
    assert all(torch.equal(before[k].to(v.device), v) for k, v in lin2.state_dict().items())
    assert type(lin2) is nn.Linear


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_save_and_reload_give_identical_output(cfg, device, tmp_path):
    backend, lin, x, q = _quantized(cfg, device)
    with torch.no_grad():
        y = q(x)
    tensors, meta = backend.export_state(q)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              str(tmp_path / "layer.safetensors"))
    loaded = load_file(str(tmp_path / "layer.safetensors"))
    q2 = backend.import_state(cfg, OUT, IN, True, DTYPE, loaded, meta, torch.device(device))
    with torch.no_grad():
        assert torch.equal(q2(x), y)
    assert measured_bytes(q2) == backend.nbytes(cfg, OUT, IN, True, DTYPE)


# compiling takes seconds: on the CPU one config of each method (its code path) in bfloat16 and
# in float32 (what --dtype auto runs on a CPU without bfloat16), all configs on the GPU
_COMPILE_CASES = ([pytest.param(next(c for c in CONFIGS if c.method == m and c.nominal_bits > 1),
                                "cpu", dt, id=f"{m}-cpu-{str(dt)[6:]}")
                   for m in methods() for dt in (torch.bfloat16, torch.float32)]
                  + [pytest.param(c, "cuda", DTYPE, id=f"{c.label}-cuda", marks=pytest.mark.gpu)
                     for c in CONFIGS])


@pytest.mark.parametrize("cfg,device,dtype", _COMPILE_CASES)
def test_compiles_in_one_graph_unless_marked_eager_only(cfg, device, dtype):
    """``autoquant apply --compile`` promise: no graph break inside a quantized layer, and the
    compiled layer computes what the eager one does (compiled as autoquant compiles)."""
    import torch._dynamo as dynamo

    from autoquant._compat import pin_inductor_simd

    backend, lin, x, q = _quantized(cfg, device, dtype)
    if backend.compile_reason:
        pytest.skip(f"{cfg.label} is eager-only: {backend.compile_reason}")
    dynamo.reset()
    explained = dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, explained.break_reasons[:1]
    pin_inductor_simd()
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    with torch.no_grad():
        y, yc = q(x), compiled(x)
        # and on one row (what Flux's modulation layers read per image): cuBLAS's int8 GEMM
        # refuses <= 16 rows once Inductor picks it
        y1, yc1 = q(x[:1]), compiled(x[:1])
    assert _rel_err(yc, y) < 0.02
    assert _rel_err(yc1, y1) < 0.02


@pytest.mark.parametrize("device", devices())
def test_compiled_torchao_int8_weight_only_runs_torchaos_eager_computation(device):
    """Left to Inductor, torchao's int8 -> bf16 weight conversion fused into a matmul kernel of
    Inductor's own: a compiled Flux-dev step took over 12 s on an H100 (251 ms eager). Compiled,
    the layer -- and the one a saved folder loads -- calls one opaque op, bit for bit eager."""
    import torch._dynamo as dynamo

    from autoquant.backends.torchao import TorchaoConfig

    cfg = TorchaoConfig(type="int8")
    backend, lin, x, q = _quantized(cfg, device)
    tensors, meta = backend.export_state(q)
    loaded = backend.import_state(cfg, OUT, IN, True, DTYPE, tensors, meta, torch.device(device))
    for layer in (q, loaded):
        dynamo.reset()
        explained = dynamo.explain(layer)(x)
        ops = [n.target for g in explained.graphs for n in g.graph.nodes
               if n.op == "call_function"]
        assert torch.ops.autoquant.int8_weight_only_mm in ops
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        with torch.no_grad():
            assert torch.equal(compiled(x), layer(x))
            assert torch.equal(compiled(x[:1]), layer(x[:1]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_quantizing_leaves_the_compiler_settings_alone(cfg, device):
    """torchao's handlers switch on Inductor's coordinate descent tuning for the whole process
    unless told not to: every later ``torch.compile`` (the user's bf16 model too) then autotuned
    each kernel for minutes. Quantizing a layer must not change global compiler settings."""
    import torch._inductor.config as inductor

    before = inductor.get_config_copy()
    _quantized(cfg, device)
    after = inductor.get_config_copy()
    assert {k: after[k] for k in after if after[k] != before.get(k)} == {}


def _families():
    """Configs that differ only in bits: their error must fall as bits rise."""
    fams = collections.defaultdict(list)
    for cfg in CONFIGS:
        d = cfg.to_dict()
        d.pop("bits", None)
        if cfg.method == "bnb":  # LLM.int8 vs NF4: one family per 4-bit type
            d.pop("type", None)
            if cfg.bits == 4 and (cfg.type != "nf4" or cfg.double_quant):
                continue
            d.pop("double_quant", None)
        if cfg.method == "torchao" and d["type"] in ("int8", "int4"):
            d["type"], d["group_size"] = "int4/int8", None
        fams[tuple(sorted((k, str(v)) for k, v in d.items()))].append(cfg)
    return [sorted(v, key=lambda c: c.bits) for v in fams.values() if len(v) > 1]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("family", _families(), ids=lambda f: "/".join(c.label for c in f))
def test_error_falls_as_bits_rise(family, device):
    errors = []
    for cfg in family:
        try:
            errors.append((cfg.bits, _error(cfg, device)[0]))
        except pytest.skip.Exception:
            continue
    if len(errors) < 2:
        pytest.skip("fewer than two bit widths run here")
    for (b1, e1), (b2, e2) in zip(errors, errors[1:]):
        assert e2 < e1, f"error at {b2} bits ({e2:.4f}) is not below {b1} bits ({e1:.4f})"


def _accepted(method: str, **fields) -> set[int]:
    """The bit widths a method's config accepts (tried one by one, 0 to 16)."""
    from autoquant import ConfigError
    from autoquant.backends import config_from_dict

    ok = set()
    for bits in range(17):
        try:
            config_from_dict({"method": method, "bits": bits, **fields})
            ok.add(bits)
        except ConfigError:
            pass
    return ok


def test_the_suite_covers_every_bit_width_each_method_accepts():
    """``configs()`` (what this suite runs) against what the config classes accept."""
    assert set(methods()) == {"none", "hqq", "bnb", "torchao", "higgs", "gptq", "gguf"}
    covered = lambda **match: {c.bits for c in CONFIGS  # noqa: E731
                               if all(getattr(c, k, None) == v for k, v in match.items())}
    assert _accepted("hqq") == covered(method="hqq") == {1, 2, 3, 4, 8}
    assert _accepted("bnb") == covered(method="bnb") == {4, 8}
    assert _accepted("gptq") == covered(method="gptq") == {2, 3, 4, 8}
    assert _accepted("torchao", type="intx") == covered(method="torchao", type="intx") \
        == set(range(1, 9))
    for p in (1, 2):
        assert _accepted("higgs", p=p) == covered(method="higgs", p=p) == {2, 3, 4}
    torchao_types = {c.type for c in CONFIGS if c.method == "torchao"}
    from autoquant.backends.torchao import TYPES

    assert torchao_types == set(TYPES)
    from autoquant.backends.gguf import TYPES as GGUF_TYPES

    assert {c.type for c in CONFIGS if c.method == "gguf"} == set(GGUF_TYPES)


def test_higgs_grids_are_gaussian_mse_optimal():
    """Lloyd-Max MSE for N(0,1): 4 levels 0.1175, 8 levels 0.03454 (Max, 1960); 2-D grids beat
    the scalar ones at the same bits."""
    from autoquant.backends import _higgs_core as core

    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    mse = {}
    for bits, p in ((2, 1), (3, 1), (2, 2)):
        pts = core._lloyd(bits, p)
        mse[bits, p] = torch.cdist(x[:, :p], pts).min(1).values.pow(2).mean().item() / p
    assert mse[2, 1] == pytest.approx(0.1175, abs=0.002)
    assert mse[3, 1] == pytest.approx(0.03454, abs=0.001)
    assert mse[2, 2] < mse[2, 1]


@pytest.mark.slow
def test_the_shipped_higgs_grids_are_what_lloyd_computes():
    from autoquant.backends import _higgs_core as core

    for bits in (2, 3, 4):
        for p in (1, 2):
            assert torch.equal(core.grid(bits, p), core._lloyd(bits, p)), (bits, p)


def test_higgs_rotation_is_orthogonal_and_stores_only_a_seed():
    from autoquant.backends import _higgs_core as core

    x = torch.randn(5, 128)
    s = core.signs(64, 3)
    y = core.rotate(x, s, 64)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), atol=1e-4)
    cfg = get_backend("higgs").configs()[0]
    q = get_backend("higgs").quantize(nn.Linear(128, 16), cfg, torch.device("cpu"))
    assert {n for n, _ in q.named_buffers()} == {"codes", "scales", "grid", "seed", "signs"}
    assert q.codes.dtype == torch.int32 and q.signs.numel() == 64


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [8, 512])
def test_higgs_triton_paths_match_pytorch(tokens):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from autoquant.backends import _higgs_core as core

    torch.manual_seed(0)
    lin = nn.Linear(512, 192).to(torch.bfloat16).cuda()
    for cfg in get_backend("higgs").configs():
        q = get_backend("higgs").quantize(lin, cfg, torch.device("cuda"))
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        w = core.dequantize_rotated(q.codes, q.scales, q.grid, cfg.bits, cfg.p, cfg.group_size,
                                    512, torch.float32)
        ref = core.rotate(x.float(), q.signs, cfg.group_size) @ w.t() + q.bias.float()
        assert _rel_err(q(x), ref) < 0.02, cfg.label
