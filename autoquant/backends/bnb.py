"""``bnb``: bitsandbytes LLM.int8 (8 bit) and NF4/FP4 (4 bit) through its ``nn`` layers.

Layout (what the device holds):
- 8 bit: int8 codes ``[out, in]`` + one float32 scale per output row (``SCB``) + bias.
- 4 bit: two codes per byte + one absmax per ``blocksize`` weights (float32; with double
  quantization: uint8 codes + a float32 offset + float32 absmax per 256 blocks + a 256-entry float32
  code book) + the 16-entry float32 code book + bias.
bitsandbytes >= 0.49 repacks 4-bit weights on the first CPU forward when the CPU has AVX512-BF16
(another layout, and a crash when out_features % 32 != 0). autoquant turns that off so that a layer
holds one layout on every device and its bytes and serialized form stay what the formula says.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from torch import nn

from .._errors import ConfigError
from ._base import (DTYPE_BYTES, Backend, QuantConfig, check_choice, check_int,
                    float_and_group_reason)

BLOCKSIZES = (64, 128, 256)


class _QuietInt8Cast(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on *every* LLM.int8 forward of a
    bf16 model (hundreds per image); it is how the kernel always works, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QuietInt8Cast())


@dataclasses.dataclass(frozen=True)
class BnbConfig(QuantConfig):
    """``{method: bnb, bits: 4, type: nf4|fp4, double_quant: false, blocksize: 64}`` or
    ``{method: bnb, bits: 8}`` (LLM.int8; ``threshold`` > 0 turns on outlier decomposition)."""

    method = "bnb"
    bits: int = 4
    type: str | None = None
    double_quant: bool = False
    blocksize: int = 64
    threshold: float = 0.0

    def __post_init__(self):
        check_int("bits", self.bits, (4, 8), method="bnb")
        if self.bits == 8:
            if self.type not in (None, "int8"):
                raise ConfigError(f"bnb: type={self.type!r} is for 4 bit; 8 bit is type int8")
            object.__setattr__(self, "type", "int8")
            if self.double_quant:
                raise ConfigError("bnb: double_quant applies to 4 bit only")
        else:
            object.__setattr__(self, "type", self.type or "nf4")
            check_choice("type", self.type, ("nf4", "fp4"), method="bnb")
            check_choice("double_quant", self.double_quant, (False, True), method="bnb")
            if self.threshold:
                raise ConfigError("bnb: threshold (outlier decomposition) applies to 8 bit only")
        check_int("blocksize", self.blocksize, BLOCKSIZES, method="bnb")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or self.threshold < 0:
            raise ConfigError(f"bnb: threshold must be a number >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def label(self) -> str:
        if self.bits == 8:
            return "bnb8" + (f"-t{self.threshold:g}" if self.threshold else "")
        return (f"bnb4-{self.type}" + ("-dq" if self.double_quant else "")
                + (f"-b{self.blocksize}" if self.blocksize != 64 else ""))


class BnbBackend(Backend):
    name = "bnb"
    config_cls = BnbConfig
    devices = ("cpu", "cuda")
    package = ('bitsandbytes', 'bitsandbytes')

    def owns(self, module):
        return type(module).__module__.startswith("bitsandbytes.")

    def layer_reason(self, cfg, out_features, in_features, dtype):
        reason = float_and_group_reason(dtype, in_features, None, "bitsandbytes computes in")
        if reason:
            return reason
        if cfg.bits == 4 and (out_features * in_features) % 2:
            return "an odd number of weights cannot be packed two per byte"
        return None

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        n = out_features * in_features
        bias_bytes = out_features * DTYPE_BYTES[dtype] if bias else 0
        if cfg.bits == 8:
            return n + 4 * out_features + bias_bytes
        blocks = math.ceil(n / cfg.blocksize)
        total = n // 2 + 16 * 4  # packed codes + nf4/fp4 code book
        if cfg.double_quant:
            # uint8 absmax codes + float32 offset + float32 absmax of each 256 absmax + code book
            total += blocks + 4 + 4 * math.ceil(blocks / 256) + 256 * 4
        else:
            total += 4 * blocks
        return total + bias_bytes

    def quantize(self, linear, cfg, device):
        import bitsandbytes as bnb

        dtype = linear.weight.dtype
        weight = linear.weight.detach().to(dtype=dtype, copy=True)
        if cfg.bits == 8:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                        bias=linear.bias is not None, has_fp16_weights=False,
                                        threshold=cfg.threshold, device="meta")
            # Int8Params quantizes when it moves from the CPU to a device (the CPU included)
            layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                      bias=linear.bias is not None, compute_dtype=dtype,
                                      compress_statistics=cfg.double_quant, quant_type=cfg.type,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                             blocksize=cfg.blocksize,
                                             compress_statistics=cfg.double_quant,
                                             quant_type=cfg.type, module=layer)
            layer.support_avx512bf16_for_cpu = False  # keep one layout everywhere (see above)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype=dtype, copy=True),
                                      requires_grad=False)
        return layer.to(device)

    def export_state(self, module):
        state = module.state_dict()
        return {k: v.detach() for k, v in state.items()}, {}

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        import bitsandbytes as bnb

        tensors = {k: v.to(device) for k, v in tensors.items()}
        if cfg.bits == 8:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias,
                                        has_fp16_weights=False, threshold=cfg.threshold,
                                        device="meta")
            weight = bnb.nn.Int8Params(tensors["weight"], requires_grad=False,
                                       has_fp16_weights=False)
            weight.CB, weight.SCB = weight.data, tensors["SCB"]
            layer.weight = weight
        else:
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype,
                                      compress_statistics=cfg.double_quant, quant_type=cfg.type,
                                      device="meta")
            stats = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                tensors["weight"], stats, requires_grad=False, device=device, module=layer)
            layer.support_avx512bf16_for_cpu = False
        if bias:
            layer.bias = nn.Parameter(tensors["bias"], requires_grad=False)
        return layer

    def configs(self):
        return [BnbConfig(bits=8), BnbConfig(bits=4, type="nf4"), BnbConfig(bits=4, type="fp4"),
                BnbConfig(bits=4, type="nf4", double_quant=True)]
