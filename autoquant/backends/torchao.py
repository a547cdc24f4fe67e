"""``torchao``: PyTorch's own quantized tensor subclasses, applied with ``torchao.quantize_``.

Types (``{method: torchao, type: ..., bits: ..., group_size: ...}``) and what the device holds:
- ``int8``, ``int8_dynamic`` (bits 8): int8 codes ``[out, in]`` + float32 scale and int8 zero
  point per output row; ``int8_dynamic`` also quantizes activations per token at run time.
- ``fp8``, ``fp8_dynamic`` (bits 8): float8 e4m3 codes + float32 scale per output row;
  ``fp8_dynamic`` quantizes activations too (per token) and needs a CUDA GPU of compute
  capability >= 8.9.
- ``fp8_dynamic_tensor`` (bits 8): fp8_dynamic with one scale per tensor, for the weight and for
  each call's activations (cuBLAS' tensor-wise fp8 GEMM instead of the row-wise kernel).
- ``fp8_int4`` (bits 4): int4 weights x fp8 activations (``Float8DynamicActivationInt4WeightConfig``,
  mslk's preshuffled layout and its CUTLASS mixed-input GEMM ``f8i4bf16_shuffled``): the weight
  is scaled to fp8 per output row, then to 4 bits per group of 128 along ``in``; the device holds
  two codes per byte + an fp8 group scale repeated 8 times (the kernel's layout) + an fp32 scale
  per row; activations are quantized per token at run time. Needs ``mslk-cuda`` and a Hopper GPU.
  The scales are mslk's (torchao's); each code is chosen for the product the kernel multiplies,
  e4m3(code x group scale), instead of round(weight / scale) (:func:`fp8_aware_int4_codes`).
- ``intx`` (bits 1..8): codes stored **unpacked, one int8 per weight**, on every device
  (IntxUnpackedToInt8Tensor), + a scale (layer dtype) and an int8 zero point per group. It cuts
  error, not bytes, below 8 bits: the byte formula says so, and the search sees it.
- ``int4`` (bits 4): tinygemm's tile-packed layout (two codes per byte + bf16 scale and zero per
  group, the weight zero-padded to in_features % 1024 == 0 and out_features % 8 == 0), CUDA and
  bfloat16 only; its kernel ships inside PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json

import torch
from torch import nn

from .._errors import ConfigError
from ._base import (DTYPE_BYTES, QUANTIZATION_CONFIG, Backend, QuantConfig, check_choice,
                    check_int, float_and_group_reason)

COMFY = "comfy"  # the ComfyUI checkpoint format (autoquant.export.comfy)
TYPES = ("int8", "int8_dynamic", "fp8", "fp8_dynamic", "fp8_dynamic_tensor", "fp8_int4",
         "fp8_int4_plain", "int4", "intx")
#: int4 weights x fp8 activations through mslk's kernels (preshuffled / plain layout)
FP8_INT4 = ("fp8_int4", "fp8_int4_plain")
#: the types that quantize activations in fp8 at run time (GPU of compute capability >= 8.9)
FP8_DYNAMIC = ("fp8_dynamic", "fp8_dynamic_tensor")
_TEMPLATES: dict = {}
_GROUPED = ("int4", "intx")
_CUDA_ONLY = (*FP8_DYNAMIC, *FP8_INT4, "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: fp8_int4's group along in_features: fixed by mslk's kernels (torchao hard-codes it too)
FP8_INT4_GROUP = 128
#: the GPUs mslk's f8i4bf16 kernels are built for (CUTLASS sm90a: Hopper)
FP8_INT4_CAPABILITY = (9, 0)


@dataclasses.dataclass(frozen=True)
class TorchaoConfig(QuantConfig):
    """``{method: torchao, type: int8}``, ``{method: torchao, type: intx, bits: 3, group_size: 64}``…"""

    method = "torchao"
    type: str = "int8"
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self):
        check_choice("type", self.type, TYPES, method="torchao")
        fixed = {"int8": 8, "int8_dynamic": 8, "fp8": 8, "fp8_dynamic": 8,
                 "fp8_dynamic_tensor": 8, "fp8_int4": 4, "fp8_int4_plain": 4,
                 "int4": 4}.get(self.type)
        if self.bits is None:
            if fixed is None:
                raise ConfigError("torchao: type intx needs bits (1..8)")
            object.__setattr__(self, "bits", fixed)
        check_int("bits", self.bits, tuple(range(1, 9)) if fixed is None else (fixed,),
                  method=f"torchao {self.type}")
        if self.type in _GROUPED:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 64)
            allowed = INT4_GROUP_SIZES if self.type == "int4" else None
            check_int("group_size", self.group_size, allowed, minimum=1,
                      method=f"torchao {self.type}")
        elif self.group_size is not None:
            why = (f"fixed at {FP8_INT4_GROUP} by mslk's kernels" if self.type in FP8_INT4
                   else "per-row scales")
            raise ConfigError(f"torchao {self.type}: group_size does not apply ({why})")

    @property
    def label(self) -> str:
        if self.type in _GROUPED:
            return f"torchao-{self.type}{self.bits if self.type == 'intx' else ''}-g{self.group_size}"
        return f"torchao-{self.type}"


def _torchao_config(cfg: TorchaoConfig):
    import torchao.quantization as tq

    # set_inductor_config=False: by default torchao's handlers switch on Inductor's coordinate
    # descent tuning (all directions) for the whole process -- every later torch.compile, the
    # user's own included, then autotunes each kernel: a Flux-dev step compiled for minutes
    # instead of seconds on an H100. Quantizing a layer must not change the process.
    quiet = {"set_inductor_config": False}
    if cfg.type == "int8":
        return tq.Int8WeightOnlyConfig(**quiet)
    if cfg.type == "int8_dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig(**quiet)
    if cfg.type == "fp8":
        return tq.Float8WeightOnlyConfig(**quiet)
    # kernel_preference TORCH: with mslk installed, torchao's AUTO moves per-row fp8 to mslk's
    # activation quantizer and GEMM, which compiled ran a Flux-dev step at 167 ms on an H100
    # against 102.5 ms through torch._scaled_mm with Inductor's fused quantization (and bf16's
    # 132): installing mslk for fp8_int4 must not slow fp8_dynamic down.
    from torchao.quantization.quantize_.common import KernelPreference

    torch_kernels = {"kernel_preference": KernelPreference.TORCH}
    if cfg.type == "fp8_dynamic":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), **quiet,
                                                            **torch_kernels)
    if cfg.type == "fp8_dynamic_tensor":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerTensor(), **quiet,
                                                            **torch_kernels)
    if cfg.type in FP8_INT4:
        return tq.Float8DynamicActivationInt4WeightConfig(
            int4_packing_format="preshuffled" if cfg.type == "fp8_int4" else "plain")
    if cfg.type == "int4":
        return tq.Int4WeightOnlyConfig(group_size=cfg.group_size,
                                       int4_packing_format="tile_packed_to_4d", **quiet)
    # Asymmetric (min/max + zero point), like hqq and tinygemm: at 1-2 bits a symmetric grid
    # wastes a level (int1 symmetric is {-1, 0}); the zero point is stored either way.
    return tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{cfg.bits}"),
                                   granularity=tq.PerGroup(cfg.group_size),
                                   mapping_type=tq.MappingType.ASYMMETRIC)


class TorchaoLinear(nn.Linear):
    """A Linear whose weight is a torchao tensor subclass: a class of its own so that peft's
    custom-module hook can give its LoRA layers by type (plain Linears stay peft's)."""


class RowPaddedLinear(TorchaoLinear):
    """An ``int8_dynamic`` layer. Compiled on CUDA, Inductor lowers its matmul to cuBLAS's int8
    GEMM, which refuses inputs of <= 16 rows ("self.size(0) needs to be greater than 16";
    pytorch/ao#2376, open) -- and Flux's modulation layers read one row per image. Such inputs
    are zero-padded to 17 rows and the pad sliced off: activations are quantized per row, so the
    real rows compute exactly what they would alone. Eager, torchao falls back by itself."""

    MIN_ROWS = 17

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if 0 < rows < self.MIN_ROWS and x.is_cuda and torch.compiler.is_compiling():
            flat = x.reshape(rows, x.shape[-1])
            pad = flat.new_zeros(self.MIN_ROWS - rows, x.shape[-1])
            y = super().forward(torch.cat([flat, pad]))[:rows]
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return super().forward(x)


@torch.library.custom_op("autoquant::int8_weight_only_mm", mutates_args=())
def _int8_weight_only_mm(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [rows, in] @ (qdata [out, in] * scale [out])^T`` -- torchao's own eager computation
    for a per-row int8 weight (``Int8Tensor``'s linear), behind an op Inductor does not look
    into."""
    m = torch.mm(x, qdata.t().to(x.dtype))
    return m * scale.to(m.dtype).flatten()


@_int8_weight_only_mm.register_fake
def _(x, qdata, scale):
    return x.new_empty(x.shape[0], qdata.shape[0])


class Int8WeightOnlyLinear(TorchaoLinear):
    """An ``int8`` (weight-only) layer. Compiled, Inductor fuses torchao's int8 -> bf16 weight
    conversion into the matmul and generates its own kernel for it: on an H100 (torch 2.11,
    torchao 0.18) a Flux-dev step with every layer so compiled took over 12 s, against 251 ms
    eager. Compiled, this layer calls torchao's eager computation as one opaque op (the weight
    converted, then cuBLAS), so the rest of the graph still compiles around it, without a break,
    and the layer costs what it costs eager (the step: 181 ms, 1.34x bf16 compiled)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        y = torch.ops.autoquant.int8_weight_only_mm(x.reshape(-1, x.shape[-1]),
                                                    self.weight.qdata, self.weight.scale)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


#: mslk's bound on an activation row's absolute maximum (``quantize_fp8_row``'s default eps)
_FP8_ROW_EPS = 1.0 / 512.0
_FP8_MAX = 448.0  # float8 e4m3's largest finite value


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, in]`` to float8 e4m3 with an fp32 scale per row: mslk's ``quantize_fp8_row``
    (scale = max(|row|, 1/512) / 448, codes = clamp(x / scale)) written in PyTorch ops, so that
    Inductor fuses it into the kernel that produced ``x``. Equal to mslk's to float rounding:
    mslk divides with ``div_rn``, PyTorch and Triton do not (a scale 1-2 ulps apart, under 1% of
    the codes one step apart; H200, ``tests/test_fp8_int4_gpu.py``)."""
    scale = x.abs().amax(dim=-1).float().clamp(min=_FP8_ROW_EPS) / _FP8_MAX
    q = (x.float() / scale[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Int4Linear(TorchaoLinear):
    """An ``fp8_int4`` / ``fp8_int4_plain`` layer: activations to fp8 per row in PyTorch ops
    (:func:`fp8_rows`), then mslk's GEMM on torchao's weight. torchao's own layer quantizes the
    activations with mslk's Triton kernel launched from Python: compiled, that kernel is a wall
    Inductor cannot fuse across, and each of a Flux step's ~500 launches costs CPU time (a
    Flux-dev step compiled took 167 ms on an H100, bf16 132 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, flat = self.weight, x.reshape(-1, x.shape[-1])
        xq, x_scale = fp8_rows(flat)
        if getattr(w, "row_scale", None) is not None:  # preshuffled
            y = torch.ops.mslk.f8i4bf16_shuffled(xq, w.qdata, x_scale, w.row_scale,
                                                 w.group_scale)
        else:
            y = torch.ops.mslk.f8i4bf16_rowwise(xq, w.qdata, x_scale, w.scale, w.zero_point)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


def fp8_int4_kernel_values(codes: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """What mslk's preshuffled kernel multiplies for ``codes [n, k]`` with e4m3 group scales
    ``[n, k / 128]``: e4m3(code x group scale), as float32 (see :func:`fp8_aware_int4_codes`)."""
    scale = group_scale.float().repeat_interleave(FP8_INT4_GROUP, dim=-1)
    return (codes.float() * scale).to(torch.float8_e4m3fn).float()


def fp8_aware_int4_codes(target: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes ``[n, k]`` (int8 in [-8, 7]) that mslk's preshuffled fp8 x int4 GEMM turns
    into the values nearest ``target`` (``[n, k]``, the weight over its fp8 row scale), given the
    e4m3 group scales ``[n, k / 128]``.

    The kernel (CUTLASS's lookup-table path for fp8 x int4) does not multiply code x scale: its
    table holds e4m3(scale x -c) for c = 1..8, negated for the positive codes, so each product is
    rounded to e4m3's 3 mantissa bits before the GEMM. mslk's quantizer picks round(w / scale),
    which after that rounding is often not the nearest of the 16 values: on demo-flux it cost
    2.6 dB against the unrounded arithmetic (BENCHMARKS section 5). e4m3 rounding is monotonic,
    so each group's 16 values are sorted and the nearest is one of the two around the target."""
    n, k = target.shape
    groups = k // FP8_INT4_GROUP
    codes = torch.arange(-8, 8, device=target.device, dtype=torch.float32)
    table = (codes * group_scale.float().reshape(n * groups, 1)).to(torch.float8_e4m3fn).float()
    t = target.float().reshape(n * groups, FP8_INT4_GROUP).contiguous()
    hi = torch.searchsorted(table, t).clamp(max=15)
    lo = (hi - 1).clamp(min=0)
    nearer_lo = (t - table.gather(1, lo)).abs() <= (table.gather(1, hi) - t).abs()
    return (torch.where(nearer_lo, lo, hi) - 8).to(torch.int8).reshape(n, k)


def _fp8_aware_preshuffled(w: torch.Tensor):
    """``w [n, k]`` on a Hopper GPU as mslk's preshuffled int4 x fp8 weight: mslk's fp8 row
    scales and e4m3 group scales (``quantize_int4_preshuffle``'s, so torchao's), codes from
    :func:`fp8_aware_int4_codes`, packed and shuffled by mslk's own ops."""
    from mslk.quantize.shuffle import int4_row_quantize, pack_int4
    from mslk.quantize.triton.fp8_quantize import quantize_fp8_row

    wq, row_scale = quantize_fp8_row(w)
    _, group_scale = int4_row_quantize(wq, FP8_INT4_GROUP)  # float32 [k / 128, n]
    group_scale = group_scale.to(torch.float8_e4m3fn)
    codes = fp8_aware_int4_codes(w.float() / row_scale[:, None], group_scale.t())
    qdata, shuffled = torch.ops.mslk.preshuffle_i4(pack_int4(codes), group_scale)
    return bf16_preshuffled_class()(qdata, shuffled, [1, FP8_INT4_GROUP], list(w.shape), None,
                                    row_scale)


@functools.cache
def bf16_preshuffled_class() -> type:
    """torchao's ``Int4PreshuffledTensor`` that says it is bfloat16, the dtype its layer takes
    and returns. torchao's own takes its dtype from its fp8 group scales: diffusers' ``model.
    dtype`` (the first floating parameter: Flux's timestep embedder) then read float8, and
    FluxPipeline failed casting its inputs to it ("Promotion for Float8 Types is not
    supported"); peft would make LoRA weights in fp8. A subclass inherits torchao's op tables,
    and every op that rebuilds the tensor rebuilds this class."""
    from torchao.quantization import Int4PreshuffledTensor

    class Bf16Int4PreshuffledTensor(Int4PreshuffledTensor):
        def __new__(cls, qdata, group_scale, block_size, shape, group_zero=None,
                    row_scale=None):
            return torch.Tensor._make_wrapper_subclass(cls, shape, device=qdata.device,
                                                       dtype=torch.bfloat16,
                                                       requires_grad=False)

    Bf16Int4PreshuffledTensor.__module__ = __name__
    return Bf16Int4PreshuffledTensor


def _load_mslk_ops() -> None:
    """Registers mslk's GEMM ops and their shape functions (what torch.compile traces)."""
    import mslk.gemm  # noqa: F401


def _linear_class(cfg: TorchaoConfig) -> type[nn.Linear]:
    return {"int8_dynamic": RowPaddedLinear, "int8": Int8WeightOnlyLinear,
            "fp8_int4": Fp8Int4Linear, "fp8_int4_plain": Fp8Int4Linear}.get(cfg.type,
                                                                           TorchaoLinear)


class TorchaoBackend(Backend):
    name = "torchao"
    config_cls = TorchaoConfig
    devices = ("cpu", "cuda")
    package = ('torchao', 'torchao')
    loggers = ("torchao",)

    def owns(self, module):
        # torchao keeps the nn.Linear and swaps its weight for a tensor subclass
        return isinstance(module, nn.Linear) and hasattr(module.weight, "__tensor_flatten__")

    def unavailable_reason(self, cfg, device):
        reason = super().unavailable_reason(cfg, device)
        if reason:
            return reason
        if cfg.type in FP8_INT4 and importlib.util.find_spec("mslk") is None:
            return (f"{cfg.label} needs mslk's kernels, which are not installed: "
                    "pip install mslk-cuda (built for your torch's CUDA)")
        if cfg.type in _CUDA_ONLY:
            if device.type != "cuda":
                return f"{cfg.label} needs a CUDA GPU (its kernels are GPU-only), not {device.type}"
            if not torch.cuda.is_available():
                return f"{cfg.label} needs a CUDA GPU and none is visible"
            cap = torch.cuda.get_device_capability(device)
            if cfg.type in FP8_DYNAMIC and cap < (8, 9):
                return (f"{cfg.label} needs compute capability >= 8.9 (Ada/Hopper); "
                        f"this GPU has {cap[0]}.{cap[1]}")
            if cfg.type in FP8_INT4 and cap != FP8_INT4_CAPABILITY:
                return (f"{cfg.label}: mslk's int4 x fp8 kernels are built for Hopper "
                        f"(compute capability 9.0); this GPU has {cap[0]}.{cap[1]}")
        if cfg.type == "int8_dynamic" and device.type == "cpu" and not _cpu_int8_gemm_exact():
            return (f"{cfg.label}: this CPU's int8 matrix multiply (oneDNN without VNNI) "
                    "saturates its 16-bit sums, >10% error per layer; use type: int8")
        return None

    def layer_reason(self, cfg, out_features, in_features, dtype):
        reason = float_and_group_reason(dtype, in_features,
                                        cfg.group_size if cfg.type in _GROUPED else None,
                                        "torchao quantizes")
        if reason:
            return reason
        if cfg.type == "int4" and dtype != torch.bfloat16:
            return f"int4 (tinygemm) needs bfloat16 weights, not {dtype}"
        if cfg.type in FP8_DYNAMIC and (in_features % 16 or out_features % 16):
            return f"{cfg.type} (scaled_mm) needs in_features and out_features divisible by 16"
        if cfg.type in FP8_INT4:
            if dtype != torch.bfloat16:
                return f"{cfg.type} (mslk's f8i4bf16) computes in bfloat16, not {dtype}"
            if in_features % FP8_INT4_GROUP or out_features % 16:
                return (f"{cfg.type} needs in_features divisible by its group "
                        f"({FP8_INT4_GROUP}) and out_features by 16 (mslk's kernels' tiles)")
        return None

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        n = out_features * in_features
        total = out_features * DTYPE_BYTES[dtype] if bias else 0
        if cfg.type in ("int8", "int8_dynamic"):
            return total + n + out_features * (4 + 1)  # codes + fp32 scale + int8 zero per row
        if cfg.type in ("fp8", "fp8_dynamic"):
            return total + n + out_features * 4  # codes + fp32 scale per row
        if cfg.type == "fp8_dynamic_tensor":
            return total + n + 4  # codes + one fp32 scale
        if cfg.type == "fp8_int4":
            # two codes per byte + an fp8 scale per group, stored 8 times over (mslk's
            # preshuffled scale layout, [in / 128, 8, out]) + an fp32 scale per row
            return total + n // 2 + (in_features // FP8_INT4_GROUP) * 8 * out_features \
                + out_features * 4
        if cfg.type == "fp8_int4_plain":  # two codes per byte + bf16 scale and zero per group
            return total + n // 2 + (in_features // FP8_INT4_GROUP) * out_features * 2 * 2
        groups = n // cfg.group_size
        if cfg.type == "int4":
            # tinygemm pads in_features to a multiple of 1024 and out_features to one of 8
            k, rows = -(-in_features // 1024) * 1024, -(-out_features // 8) * 8
            return total + rows * k // 2 + (k // cfg.group_size) * rows * 2 * 2
        return total + n + groups * (DTYPE_BYTES[dtype] + 1)  # unpacked codes + scale + int8 zero

    def quantize(self, linear, cfg, device):
        from torchao.quantization import quantize_

        layer = _linear_class(cfg)(linear.in_features, linear.out_features,
                                   bias=linear.bias is not None, device=device,
                                   dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.requires_grad_(False)
        if cfg.type in FP8_INT4:
            _load_mslk_ops()
        if cfg.type == "fp8_int4":
            layer.weight = nn.Parameter(_fp8_aware_preshuffled(layer.weight.detach()),
                                        requires_grad=False)
            return layer
        quantize_(layer, _torchao_config(cfg), device=device)
        return layer

    def export_state(self, module):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        if isinstance(module.weight, bf16_preshuffled_class()):
            return _preshuffled_state(module)

        # torchao's flattener names inner tensors "<prefix>._<name>_<field>": keys need a prefix
        state = {"layer.weight": module.weight.detach()}
        if module.bias is not None:
            state["layer.bias"] = module.bias.detach()
        tensors, metadata = flatten_tensor_state_dict(state)
        return tensors, {"torchao": json.dumps(metadata)}

    def _template(self, cfg, out_features, in_features, bias, dtype):
        """What :meth:`export_state` writes for such a layer, from one quantized here (torchao
        quantizes without optimization: a fraction of a second even for Flux's largest layer).
        Its metadata is the only metadata a saved layer may carry."""
        key = (cfg, out_features, in_features, bias, dtype)
        if key not in _TEMPLATES:
            device = torch.device("cuda" if cfg.type in _CUDA_ONLY else "cpu")
            lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.fill_(0.5)
            tensors, meta = self.export_state(self.quantize(lin, cfg, device))
            _TEMPLATES[key] = ({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, meta)
        return _TEMPLATES[key]

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        return self._template(cfg, out_features, in_features, bias, dtype)[0]

    def state_problems(self, cfg, out_features, in_features, bias, dtype, tensors, meta):
        if not isinstance(meta, dict) or set(meta) != {"torchao"} or \
                not isinstance(meta["torchao"], str):
            return ["metadata must be torchao's flattening metadata"]
        problems = super().state_problems(cfg, out_features, in_features, bias, dtype, tensors,
                                          {})
        want = self._template(cfg, out_features, in_features, bias, dtype)[1]["torchao"]
        try:
            got = json.loads(meta["torchao"])
            if not isinstance(got, dict):
                raise ValueError
            if cfg.type in FP8_DYNAMIC:
                got = _torch_kernels(got)
            same = _parsed(got) == _parsed(json.loads(want))
        except ValueError:
            same = False
        if not same:
            problems.append(f"torchao metadata differs from what {cfg.label} writes for a "
                            f"{out_features}x{in_features} layer")
        return problems

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        metadata = json.loads(meta["torchao"])
        if cfg.type in FP8_DYNAMIC:
            metadata = _torch_kernels(metadata)
        if cfg.type in FP8_INT4:
            _load_mslk_ops()
        if cfg.type == "fp8_int4":  # (state_problems has matched the metadata to the template's)
            state = _preshuffled_from_state({k: v.to(device) for k, v in tensors.items()},
                                            metadata[_PRESHUFFLED])
        else:
            state, _ = unflatten_tensor_state_dict({k: v.to(device) for k, v in tensors.items()},
                                                   metadata)
        layer = _linear_class(cfg)(in_features, out_features, bias=bias, device="meta",
                                   dtype=dtype)
        layer.weight = nn.Parameter(state["layer.weight"], requires_grad=False)
        if bias:
            layer.bias = nn.Parameter(state["layer.bias"], requires_grad=False)
        return layer

    def formats(self, cfg):
        # diffusers' TorchAoConfig with one config per layer (FqnToConfig) builds the same
        # tensor subclass from the same torchao config; safetensors holds every one of them
        # (torchao's allow-list: Int8Tensor, Float8Tensor, Int4TilePackedTo4dTensor,
        # IntxUnpackedToInt8Tensor)
        out = super().formats(cfg)
        # not fp8_int4: torchao's safetensors support refuses preshuffled int4; not
        # fp8_int4_plain yet: its diffusers round trip (an Int4Tensor with fp8 activations,
        # computed by torchao's layer) has not run on a GPU
        if cfg.type not in FP8_INT4:
            out["diffusers"] = QUANTIZATION_CONFIG
        if cfg.type in ("int8", "int8_dynamic"):
            # ComfyUI's int8_tensorwise takes a scale per output row: torchao's very codes and
            # scales (its zero point is always 0: symmetric), dequantized as q * scale
            out[COMFY] = "int8_tensorwise"
        return out

    def near_format(self, cfg, fmt):
        # ComfyUI's float8_e4m3fn holds one scale per tensor, torchao's fp8 one per row: the
        # rows' values are re-quantized to fp8 under one scale (comfy-kitchen's quantizer)
        if fmt == COMFY and cfg.type in ("fp8", "fp8_dynamic"):
            return "float8_e4m3fn"
        return None

    def export_tensors(self, linear, cfg, fmt):
        if fmt != COMFY or cfg.type not in ("int8", "int8_dynamic", "fp8", "fp8_dynamic"):
            raise ValueError(f"{cfg.label} has no {fmt} tensors")
        # fp8_dynamic's weights are fp8's (Float8Tensor per row from the same function); only
        # fp8 weight-only can be made without a GPU of compute capability >= 8.9
        made = TorchaoConfig(type={"fp8_dynamic": "fp8"}.get(cfg.type, cfg.type))
        w = self.quantize(linear, made, torch.device("cpu")).weight
        if cfg.type.startswith("int8") and bool((w.zero_point != 0).any()):
            raise ValueError(f"{cfg.label}: a nonzero zero point, which int8_tensorwise lacks")
        return {"weight": w.qdata.detach().clone(),
                "weight_scale": w.scale.detach().float().reshape(-1, 1).clone()}

    def lora_layers(self):
        from peft.tuners.lora.torchao import TorchaoLoraLinear

        from ._lora import refusing_merge

        return {TorchaoLinear: _torchao_lora_class(refusing_merge(TorchaoLoraLinear, "torchao"))}

    def diffusers_config(self, configs):
        from diffusers import TorchAoConfig
        from torchao.quantization import FqnToConfig

        # one torchao config per layer, made by the function this backend's layers are made
        # with: diffusers calls quantize_ on each Linear as it loads, with that config
        return TorchAoConfig(FqnToConfig({path: _torchao_config(cfg)
                                          for path, cfg in configs.items()}))

    def configs(self):
        return ([TorchaoConfig(type=t) for t in ("int8", "int8_dynamic", "fp8", "fp8_dynamic",
                                                  "fp8_dynamic_tensor", *FP8_INT4)]
                + [TorchaoConfig(type="int4", group_size=64)]
                + [TorchaoConfig(type="intx", bits=b, group_size=64) for b in range(1, 9)])


def _torch_kernels(metadata: dict) -> dict:
    """torchao's flattening metadata (``{tensor name: JSON string}``) with an fp8 weight's
    kernel preference AUTO made TORCH, as this backend's fp8_dynamic configs now make them:
    folders saved before (the same codes and scales, made without mslk) load, and run torch's
    kernels."""
    def walk(v):
        if isinstance(v, dict):
            if v.get("_type") == "KernelPreference" and v.get("_data") == "AUTO":
                return {**v, "_data": "TORCH"}
            return {k: walk(x) for k, x in v.items()}
        return [walk(x) for x in v] if isinstance(v, list) else v

    out = {}
    for name, value in metadata.items():
        try:
            inner = json.loads(value) if name != "tensor_names" else None
        except (TypeError, ValueError):
            inner = None
        out[name] = json.dumps(walk(inner)) if isinstance(inner, dict) else value
    return out


def _parsed(metadata: dict) -> dict:
    """The metadata with its JSON strings parsed (to compare content, not spelling)."""
    def load(v):
        try:
            return json.loads(v)
        except (TypeError, ValueError):
            return v
    return {k: load(v) for k, v in metadata.items()}


_PRESHUFFLED = "Int4PreshuffledTensor"
_PRESHUFFLED_FIELDS = ("qdata", "group_scale", "row_scale")


def _preshuffled_state(module):
    """A preshuffled int4 x fp8 weight's tensors and attributes, as they are on the device.
    torchao's safetensors flattener allows only the tensor classes diffusers can reload, and
    this is not one of them; the layout is mslk's, so it is written as it is held."""
    w = module.weight
    tensors = {f"layer.weight.{f}": getattr(w, f).detach() for f in _PRESHUFFLED_FIELDS}
    if module.bias is not None:
        tensors["layer.bias"] = module.bias.detach()
    attrs = {"block_size": list(w.block_size), "shape": list(w.shape)}
    return tensors, {"torchao": json.dumps({_PRESHUFFLED: attrs}, sort_keys=True)}


def _preshuffled_from_state(tensors, attrs):
    weight = bf16_preshuffled_class()(
        qdata=tensors["layer.weight.qdata"], group_scale=tensors["layer.weight.group_scale"],
        block_size=list(attrs["block_size"]), shape=list(attrs["shape"]), group_zero=None,
        row_scale=tensors["layer.weight.row_scale"])
    return {"layer.weight": weight, **({"layer.bias": tensors["layer.bias"]}
                                       if "layer.bias" in tensors else {})}


@functools.cache
def _torchao_lora_class(refusing: type) -> type:
    """peft's TorchaoLoraLinear (merge refused), told it will never re-quantize: peft warns on
    every layer made without a re-quantizing function, which is only used by merge."""
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("get_apply_tensor_subclass", _never_requantized)
        refusing.__init__(self, *args, **kwargs)

    return type(refusing.__name__, (refusing,), {"__init__": __init__,
                                                 "__module__": __name__,
                                                 "__qualname__": refusing.__name__})


def _never_requantized(*args, **kwargs):
    raise ValueError("torchao LoRA layers are never merged")


@functools.cache
def _cpu_int8_gemm_exact() -> bool:
    """Whether int8 x int8 products on this CPU keep their precision. Without VNNI (AVX2-only
    CPUs, or ``ONEDNN_MAX_CPU_ISA=AVX2``) oneDNN pairs u8 x s8 products into saturating int16
    sums: a 512 -> 192 layer of int8_dynamic measured 13% error there, 0.8% with VNNI. Probed
    once per process on the path int8_dynamic takes (milliseconds)."""
    from torchao.quantization import quantize_

    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(512, 192).requires_grad_(False)
    with torch.no_grad():
        layer.weight.uniform_(-0.05, 0.05, generator=gen)
        layer.bias.zero_()
        x = torch.randn(32, 512, generator=gen)
        ref = layer(x)
        quantize_(layer, _torchao_config(TorchaoConfig(type="int8_dynamic")))
        return ((layer(x) - ref).norm() / ref.norm()).item() < 0.05
