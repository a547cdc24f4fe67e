"""``none``: keep the layer in the pipeline's dtype (full precision)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._base import DTYPE_BYTES, Backend, QuantConfig


@dataclasses.dataclass(frozen=True)
class NoneConfig(QuantConfig):
    """Leave the layer unquantized. Counts towards the full-precision share."""

    method = "none"
    full_precision = True

    @property
    def nominal_bits(self) -> float:
        return 16.0  # the pipelines autoquant targets run in bf16/fp16

    @property
    def label(self) -> str:
        return "none"


def linear_on(linear: nn.Linear, device: torch.device) -> nn.Linear:
    """``linear`` itself when it already lives on ``device``; else a copy there (the original is
    not moved, so a failed apply leaves the pipeline as it was)."""
    if linear.weight.device == device:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.requires_grad_(False)
    return new


class NoneBackend(Backend):
    name = "none"
    config_cls = NoneConfig

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        return (out_features * in_features + (out_features if bias else 0)) * DTYPE_BYTES[dtype]

    def quantize(self, linear, cfg, device):
        return linear_on(linear, device)

    def export_state(self, module):
        tensors = {"weight": module.weight.detach()}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors, {}

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        out = {"weight": ((out_features, in_features), dtype)}
        if bias:
            out["bias"] = ((out_features,), dtype)
        return out

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        new = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        new.load_state_dict({k: v.to(device) for k, v in tensors.items()})
        return new.requires_grad_(False)

    def formats(self, cfg):
        # a GGUF file keeps a full-precision layer in the model's dtype (BF16, F16 or F32), and
        # so does a diffusers folder
        return {**super().formats(cfg), "gguf": "dtype", "diffusers": "dtype"}

    def configs(self):
        return [NoneConfig()]
