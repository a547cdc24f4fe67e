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

    def to_dict(self):
        """Only the options that apply: ``{method: bnb, bits: 8, threshold: 0.0}`` or
        ``{method: bnb, bits: 4, type: nf4, double_quant: false, blocksize: 64}``."""
        if self.bits == 8:
            return {"method": self.method, "bits": 8, "threshold": self.threshold}
        return {"method": self.method, "bits": 4, "type": self.type,
                "double_quant": self.double_quant, "blocksize": self.blocksize}

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
    # its CPU kernels come through Hugging Face's ``kernels`` ("Skipping publisher trust check")
    loggers = ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends", "kernels")

    def owns(self, module):
        return type(module).__module__.startswith("bitsandbytes.")

    def lora_layers(self):
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        from ._lora import refusing_merge

        # peft's own bitsandbytes LoRA layers, merging refused (peft would re-quantize)
        return {bnb.nn.Linear4bit: refusing_merge(Linear4bit, "bitsandbytes"),
                bnb.nn.Linear8bitLt: refusing_merge(Linear8bitLt, "bitsandbytes")}

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

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        import torch

        n = out_features * in_features
        out: dict = {}
        if cfg.bits == 8:
            out = {"weight": ((out_features, in_features), torch.int8),
                   "SCB": ((out_features,), torch.float32), "weight_format": ((), torch.uint8)}
        else:
            blocks = math.ceil(n / cfg.blocksize)
            out = {"weight": ((n // 2, 1), torch.uint8),
                   "weight.quant_map": ((16,), torch.float32),
                   "weight.absmax": ((blocks,), torch.uint8 if cfg.double_quant
                                     else torch.float32)}
            if cfg.double_quant:
                out["weight.nested_absmax"] = ((math.ceil(blocks / 256),), torch.float32)
                out["weight.nested_quant_map"] = ((256,), torch.float32)
        if bias:
            out["bias"] = ((out_features,), dtype)
        return out

    def state_problems(self, cfg, out_features, in_features, bias, dtype, tensors, meta):
        """bitsandbytes packs its 4-bit quant state as JSON inside a uint8 tensor; it must say
        exactly what the config and the layer say (only the double-quant offset is data)."""
        import json

        tensors = dict(tensors)
        packed_key = f"weight.quant_state.bitsandbytes__{cfg.type}"
        packed = tensors.pop(packed_key, None) if cfg.bits == 4 else None
        problems = super().state_problems(cfg, out_features, in_features, bias, dtype, tensors,
                                          meta)
        if cfg.bits == 8:
            fmt = tensors.get("weight_format")
            if fmt is not None and fmt.shape == () and int(fmt) != 0:
                problems.append("weight_format must be 0 (row-major int8)")
            return problems
        if packed is None or packed.dim() != 1 or packed.dtype.itemsize != 1 \
                or packed.numel() > 4096:
            return problems + [f"missing or malformed tensor {packed_key!r}"]
        try:
            state = json.loads(bytes(packed.tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return problems + [f"{packed_key!r} is not the JSON bitsandbytes writes"]
        want = {"quant_type": cfg.type, "blocksize": cfg.blocksize,
                "dtype": str(dtype).replace("torch.", ""), "shape": [out_features, in_features]}
        if cfg.double_quant:
            want.update(nested_blocksize=256, nested_dtype="float32")
        offset = state.pop("nested_offset", None) if isinstance(state, dict) else None
        if state != want:
            problems.append(f"{packed_key!r} says {state!r}, the config and layer say {want!r}")
        if cfg.double_quant and not (isinstance(offset, (int, float))
                                     and not isinstance(offset, bool)
                                     and math.isfinite(offset)):
            problems.append(f"{packed_key!r}: nested_offset must be a finite number")
        return problems

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
