"""hqq's ``HQQLinear``, showing the shape of the weight it stores as codes.

diffusers' LoRA loaders read every target layer's weight -- ``transformer.state_dict()
["<layer>.weight"]`` and ``layer.weight.shape`` -- to check a LoRA's shapes against it (Flux's
``_maybe_expand_lora_state_dict``), and peft puts a new adapter on ``layer.weight``'s device.
HQQLinear stores codes, scales and zeros, no ``weight``: ``pipe.load_lora_weights`` failed on
it with a KeyError. This subclass answers both with :func:`weight_stub` (the weight's shape,
device and dtype, one stored value); everything else is hqq's own.
"""

from __future__ import annotations

import torch
from hqq.core import quantize

from ._base import weight_stub


class HQQLinear(quantize.HQQLinear):
    """``hqq.HQQLinear`` with a shape-only ``weight`` (see the module's docstring). It keeps
    hqq's class name: peft recognizes hqq layers by it (``_get_in_out_features``)."""

    @property
    def weight(self) -> torch.Tensor:
        out_features, in_features = self.meta["shape"]
        return weight_stub(out_features, in_features, self.W_q.device, self.compute_dtype)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.is_initialized():
            stub = self.weight
            state["weight"] = stub
            if "destination" in kwargs and "prefix" in kwargs:
                kwargs["destination"][kwargs["prefix"] + "weight"] = stub
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "weight", None)  # the stub: nothing to load
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["HQQLinear"]
