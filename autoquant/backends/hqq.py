"""``hqq``: Half-Quadratic Quantization (Badri & Shaji), data-free, through ``hqq.HQQLinear``.

Layout on every device (axis=1 grouping, the one HQQLinear's fast paths use): the weight is cut
into R = out*in/group_size groups of ``group_size`` consecutive input weights; the codes are packed
along the group axis (8 bit: 1/byte, 4 bit: 2/byte, 2 bit: 4/byte, 1 bit: 8/byte, 3 bit: 10 per
int32 word with the group count rounded up to a multiple of 10); one scale and one zero per group
are kept in the layer's dtype; the bias in the layer's dtype.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ._base import DTYPE_BYTES, Backend, QuantConfig, check_int, float_and_group_reason

BITS = (1, 2, 3, 4, 8)
AWQ_GROUP = 64  # the group size of ComfyUI's awq_w4a16 layout
#: groups per packed unit along the packing axis: a group count not divisible by it would be
#: silently truncated by hqq's packer, so such layers are refused.
_PACK_ROWS = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}


@dataclasses.dataclass(frozen=True)
class HQQConfig(QuantConfig):
    """``{method: hqq, bits: 1|2|3|4|8, group_size: 64}``; group_size a multiple of 8."""

    method = "hqq"
    bits: int = 4
    group_size: int = 64

    def __post_init__(self):
        check_int("bits", self.bits, BITS, method=self.method)
        check_int("group_size", self.group_size, minimum=8, method=self.method)
        if self.group_size % 8:
            from .._errors import ConfigError
            raise ConfigError(f"{self.method}: group_size={self.group_size} must be a multiple "
                              f"of 8")

    @property
    def label(self) -> str:
        return f"hqq{self.bits}-g{self.group_size}"


class HQQBackend(Backend):
    name = "hqq"
    config_cls = HQQConfig
    devices = ("cpu", "cuda")
    package = ('hqq', 'hqq')
    loggers = ("hqq",)

    def owns(self, module):
        from hqq.core.quantize import HQQLinear

        return isinstance(module, HQQLinear)

    def layer_reason(self, cfg, out_features, in_features, dtype):
        reason = float_and_group_reason(dtype, in_features, cfg.group_size, "hqq computes in")
        if reason:
            return reason
        groups = out_features * in_features // cfg.group_size
        if groups % _PACK_ROWS[cfg.bits]:
            return (f"{groups} groups is not divisible by {_PACK_ROWS[cfg.bits]}, "
                    f"which {cfg.bits}-bit packing needs")
        return None

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        g = cfg.group_size
        groups = out_features * in_features // g
        if cfg.bits == 3:
            codes = math.ceil(groups / 10) * g * 4  # 10 codes per int32, group count padded
        else:
            codes = groups * g * cfg.bits // 8
        meta = 2 * groups * DTYPE_BYTES[dtype]  # one scale + one zero per group
        return codes + meta + (out_features * DTYPE_BYTES[dtype] if bias else 0)

    def quantize(self, linear, cfg, device):
        from hqq.core.quantize import BaseQuantizeConfig

        from ._hqq_layer import HQQLinear as ShapedHQQLinear

        # HQQLinear deletes the parameters of the layer it is given: hand it a throw-away shell
        # that shares (a device copy of) the weights, so the caller's layer stays intact.
        shell = nn.Linear(linear.in_features, linear.out_features,
                          bias=linear.bias is not None, device="meta")
        shell.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
        if linear.bias is not None:
            shell.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        qcfg = BaseQuantizeConfig(nbits=cfg.bits, group_size=cfg.group_size, axis=1)
        return ShapedHQQLinear(shell, qcfg, del_orig=True, compute_dtype=linear.weight.dtype,
                         device=str(device))

    def export_state(self, module):
        # Only the data: codes, scale, zero, bias. Everything else hqq keeps (bits, group size,
        # shape, packing, dtypes) follows from the config and the layer, so a saved folder never
        # carries it -- hqq decodes its own metadata tensors with eval().
        tensors = {"W_q": module.W_q.detach(), "scale": module.meta["scale"].detach(),
                   "zero": module.meta["zero"].detach()}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors, {}

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        g = cfg.group_size
        groups = out_features * in_features // g
        if cfg.bits == 3:
            codes = ((math.ceil(groups / 10), g), torch.int32)
        else:
            codes = ((groups * cfg.bits // 8, g), torch.uint8)
        out = {"W_q": codes, "scale": ((groups, 1), dtype), "zero": ((groups, 1), dtype)}
        if bias:
            out["bias"] = ((out_features,), dtype)
        return out

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        from hqq.core.quantize import Quantizer

        from ._hqq_layer import HQQLinear as ShapedHQQLinear

        layer = ShapedHQQLinear(None, quant_config=None, compute_dtype=dtype, device=str(device),
                          initialize=False)
        packing = Quantizer.bit_to_packing[cfg.bits]
        params = {"nbits": cfg.bits, "channel_wise": True, "group_size": cfg.group_size,
                  "optimize": True, "round_zero": True, "axis": 1, "view_as_float": False}
        # hqq's plain (not "encoded") state: every value built here, none read from the file
        layer.load_state_dict({
            "stores_quant_config": True, **params,
            "W_q": torch.nn.Parameter(tensors["W_q"].to(device), requires_grad=False),
            "bias": tensors["bias"].to(device) if bias else None,
            "offload_meta": False, "shape": torch.Size([out_features, in_features]),
            "scale": tensors["scale"].to(device), "zero": tensors["zero"].to(device),
            "packing": packing, "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
            "quant_scale": False, "quant_zero": False, "compute_dtype": dtype})
        return layer

    def lora_layers(self):
        from peft.tuners.lora.hqq import HqqLoraLinear

        from ._hqq_layer import HQQLinear
        from ._lora import refusing_merge

        # peft's own hqq LoRA layer, but merging refused: peft would re-quantize the layer
        return {HQQLinear: refusing_merge(HqqLoraLinear, "hqq")}

    def configs(self):
        return [HQQConfig(bits=b, group_size=64) for b in BITS]

    # -- GGUF: 4-bit hqq (axis 1, groups of a multiple of 32) is GGUF's Q4_1 but for rounding ----
    def near_format(self, cfg, fmt):
        if fmt == "gguf" and cfg.bits == 4 and cfg.group_size % 32 == 0:
            return "Q4_1"
        if fmt == "comfy" and cfg.bits == 4 and cfg.group_size == AWQ_GROUP:
            return "awq_w4a16"
        return None

    def export_tensors(self, linear, cfg, fmt):
        """ComfyUI's ``awq_w4a16`` of hqq's own codes: AWQ computes ``(q - 8) * s + z`` per
        group of 64 inputs, hqq ``(q - zero) * scale``, so ``s = scale`` and
        ``z = (8 - zero) * scale``, both rounded to 16 bits (fp16 where every value is a
        normal fp16 number, else bf16) -- near-exact: score the file again."""
        from hqq.core.quantize import Quantizer

        if self.near_format(cfg, fmt) != "awq_w4a16":
            raise ValueError(f"{cfg.label} has no {fmt} tensors")
        n, k = linear.out_features, linear.in_features
        q = self.quantize(linear, cfg, torch.device("cpu"))
        codes = Quantizer.unpack[q.meta["packing"]](q.W_q, dtype=torch.uint8)
        codes = codes[: n * k // cfg.group_size].reshape(n, k)
        scale = q.meta["scale"].float().reshape(n, k // cfg.group_size)
        zero = q.meta["zero"].float().reshape(n, k // cfg.group_size)
        zeros = (8.0 - zero) * scale
        both = torch.cat([scale.abs().flatten(), zeros.abs().flatten()])
        nonzero = both[both > 0]
        fits_fp16 = bool(nonzero.numel() == 0 or (nonzero.min() >= 2.0 ** -14
                                                  and nonzero.max() < 65504))
        half = torch.float16 if fits_fp16 else torch.bfloat16
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)  # low nibble first
        return {"weight": packed.contiguous(),
                "weight_scale": scale.t().contiguous().to(half),
                "weight_zeros": zeros.t().contiguous().to(half)}

    def near_export(self, linear, cfg, fmt):
        """Q4_1 blocks of hqq's own codes: ``d = scale``, ``m = -zero * scale`` (fp16), the
        4-bit codes as they are; hqq computes ``(q - zero) * scale``, Q4_1 ``d * q + m``."""
        import numpy as np
        from hqq.core.quantize import Quantizer

        if self.near_format(cfg, fmt) is None:
            raise ValueError(f"{cfg.label} has no near-exact {fmt} type")
        q = self.quantize(linear, cfg, torch.device("cpu"))
        codes = Quantizer.unpack[q.meta["packing"]](q.W_q, dtype=torch.uint8)
        codes = codes[: linear.out_features * linear.in_features // cfg.group_size]
        scale = q.meta["scale"].float().reshape(-1, 1)
        zero = q.meta["zero"].float().reshape(-1, 1)
        per = cfg.group_size // 32
        blocks = codes.reshape(-1, 32).numpy().astype(np.uint8)
        d = scale.repeat_interleave(per, 0).half().numpy().view(np.uint8).reshape(-1, 2)
        m = (-zero * scale).repeat_interleave(per, 0).half().numpy().view(np.uint8).reshape(-1, 2)
        qs = blocks[:, :16] | (blocks[:, 16:] << 4)
        out = np.concatenate([d, m, qs], axis=1)  # ggml's block_q4_1: d, m, qs[16]
        return out.reshape(linear.out_features, -1)
