"""``gptq``: GPTQ (Frantar et al., 2022) -- calibrated rounding into hqq's layout and kernels.

Each weight column is rounded in turn and its rounding error is spread over the columns not yet
rounded, through the inverse of the layer's input Hessian H = X^T X / n (1% damping), so the
layer's *output* on the calibration inputs moves as little as possible; hqq alone rounds each
weight to its nearest grid point. The grid is hqq's own (a scale and zero per group of
``group_size`` inputs, optimized on the original weights): on correlated inputs GPTQ onto hqq's
grid beat GPTQ onto min-max grids at 2 to 8 bits (0.20 vs 0.50 relative output error at 2 bits,
0.037 vs 0.039 at 4; hqq alone 0.30 and 0.061). The codes, one scale and one zero per group are
stored exactly as
``hqq`` stores them (axis-1 groups, packed codes, scale and zero in the layer's dtype): the same
bytes, the same kernels, the same saved-folder format.

H comes from :mod:`autoquant.generation.calibration`: a search calibrates on its prompt set before it
quantizes anything, ``apply`` on the model's search prompts when a recipe holds gptq layers;
quantizing an uncalibrated layer is an error that says so.
"""

from __future__ import annotations

import dataclasses

import torch

from ._base import check_int
from .hqq import HQQBackend, HQQConfig

BITS = (2, 3, 4, 8)
DAMP = 0.01  # of H's mean diagonal, added to it: keeps the inverse defined for unused inputs
BLOCK = 128  # columns updated together (lazy batch updates; the result does not depend on it)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(HQQConfig):
    """``{method: gptq, bits: 2|3|4|8, group_size: 64}``; group_size a multiple of 8 (hqq's
    fields and checks, fewer bit widths)."""

    method = "gptq"

    def __post_init__(self):
        check_int("bits", self.bits, BITS, method=self.method)
        super().__post_init__()

    @property
    def label(self) -> str:
        return f"gptq{self.bits}-g{self.group_size}"

    def storage(self) -> HQQConfig:
        """The hqq config whose layout (and kernels) this config's layers use."""
        return HQQConfig(bits=self.bits, group_size=self.group_size)


def hqq_grid(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """hqq's optimized grid for ``w`` (out x in): ``(scale, zero)``, each ``out x in/group_size``,
    rounded to ``dtype`` as hqq stores them."""
    from hqq.core.quantize import Quantizer

    _, meta = Quantizer.quantize(w.float(), nbits=bits, channel_wise=True, group_size=group_size,
                                 optimize=True, round_zero=False, axis=1, bitpack=False,
                                 compute_dtype=torch.float32, device=str(w.device))
    shape = (w.shape[0], w.shape[1] // group_size)
    return (meta["scale"].reshape(shape).to(dtype).float(),
            meta["zero"].reshape(shape).to(dtype).float())


def gptq_codes(w: torch.Tensor, h: torch.Tensor, bits: int, scale: torch.Tensor,
               zero: torch.Tensor) -> torch.Tensor:
    """GPTQ's rounding of ``w`` (out x in, float32) under input Hessian ``h`` onto the grid
    ``(codes - zero) * scale`` (scale and zero per group: ``out x groups``): the codes, ``out x
    in`` uint8."""
    w = w.clone()
    h = h.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out_f, in_f = w.shape
    group = in_f // scale.shape[1]
    top = 2 ** bits - 1
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=w.device), \
            hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = scale[:, (i1 + i) // group], zero[:, (i1 + i) // group]
            q = torch.clamp(torch.round(w1[:, i] / s + z), 0, top)
            codes[:, i1 + i] = q.to(torch.uint8)
            e = (w1[:, i] - (q - z) * s) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


class GPTQBackend(HQQBackend):
    name = "gptq"
    config_cls = GPTQConfig
    #: needs :mod:`autoquant.generation.calibration` data for every layer it quantizes
    calibrated = True

    def owns(self, module):
        return False  # its layers are hqq's HQQLinear: hqq's backend answers for them

    def layer_reason(self, cfg, out_features, in_features, dtype):
        return super().layer_reason(cfg.storage(), out_features, in_features, dtype)

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        return super().nbytes(cfg.storage(), out_features, in_features, bias, dtype)

    def timing_config(self, cfg):
        return cfg.storage()  # the same kernels: timed as the hqq config (no calibration needed)

    def quantize(self, linear, cfg, device):
        from hqq.core.quantize import Quantizer

        from ._hessians import hessian

        h = hessian(linear)
        if h is None:
            raise RuntimeError(
                "no calibration data for this layer: gptq needs its inputs' Hessian -- "
                "autoquant.calibrate(pipe, settings, layers) first (search and apply do it)")
        out_f, in_f, g = linear.out_features, linear.in_features, cfg.group_size
        w = linear.weight.detach().to(device, torch.float32)
        dtype = linear.weight.dtype
        scale, zero = hqq_grid(w, cfg.bits, g, dtype)
        codes = gptq_codes(w, h.to(device), cfg.bits, scale, zero)
        packed = Quantizer.pack[Quantizer.bit_to_packing[cfg.bits]](codes.reshape(-1, g))
        tensors = {"W_q": packed, "scale": scale.reshape(-1, 1).to(dtype),
                   "zero": zero.reshape(-1, 1).to(dtype)}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().to(device)
        return self.import_state(cfg, out_f, in_f, linear.bias is not None, dtype, tensors, {},
                                 device)

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        return super().expected_tensors(cfg.storage(), out_features, in_features, bias, dtype)

    def configs(self):
        return [GPTQConfig(bits=b, group_size=64) for b in BITS]


__all__ = ["GPTQConfig", "GPTQBackend", "gptq_codes", "hqq_grid"]
