"""``higgs``: data-free Hadamard rotation + Gaussian MSE-optimal grids (HIGGS), 2-4 bits.

``{method: higgs, bits: 2|3|4, p: 1|2, group_size: 64, seed: 0}`` -- p=1 codes each weight on a
scalar Lloyd-Max grid, p=2 codes pairs on a 2-D grid (2**(2*bits) points), which is more accurate
at the same bits. What the device holds: the codes bit-packed into int32 words along the input
dimension (k = bits*p bits per code, 32//k codes per word, rows padded to whole words), one scale
per group in the layer dtype, the grid (float32), the rotation's int64 seed and its sign vector
(int8, group_size entries, derived from the seed) -- never the rotation matrix -- and the bias.
Forward: the activations are rotated with the same transform (fast Walsh-Hadamard, O(g log g) per
group) and multiplied by the still-rotated weight -- on CUDA (bf16) by one Triton kernel that
decodes the codes in registers, elsewhere by dequantizing in PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from torch import nn

from . import _higgs_core as core
from ._base import DTYPE_BYTES, Backend, QuantConfig, check_int, float_and_group_reason

GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class HiggsConfig(QuantConfig):
    method = "higgs"
    bits: int = 4
    p: int = 2
    group_size: int = 64
    seed: int = 0

    def __post_init__(self):
        check_int("bits", self.bits, (2, 3, 4), method="higgs")
        check_int("p", self.p, (1, 2), method="higgs")
        check_int("group_size", self.group_size, GROUP_SIZES, method="higgs")
        check_int("seed", self.seed, minimum=0, method="higgs")

    @property
    def label(self) -> str:
        return f"higgs{self.bits}-p{self.p}-g{self.group_size}"


class HiggsLinear(nn.Module):
    def __init__(self, in_features, out_features, bits, p, group_size, codes, scales, grid, seed,
                 bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.p, self.group_size = bits, p, group_size
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("grid", grid)
        self.register_buffer("seed", seed)
        self.register_buffer("signs", core.signs(group_size, int(seed)).to(
            device=codes.device, dtype=torch.int8), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, p={self.p}, group_size={self.group_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_rot = core.rotate(x, self.signs, self.group_size)
        from . import _higgs_triton as tri

        # the Triton kernel has no backward: a gradient that must flow through the layer to
        # its input (LoRA layers below it, training) takes the torch path, same weights
        if tri.available(x_rot) and not (torch.is_grad_enabled() and x_rot.requires_grad):
            return tri.matmul(x_rot, self.codes, self.grid, self.scales, self.bias, self.bits,
                              self.p, self.group_size, self.out_features)
        w = core.dequantize_rotated(self.codes, self.scales, self.grid, self.bits, self.p,
                                    self.group_size, self.in_features, x.dtype)
        out = x_rot @ w.t()
        return out + self.bias if self.bias is not None else out


class HiggsBackend(Backend):
    name = "higgs"
    config_cls = HiggsConfig
    devices = ("cpu", "cuda")

    def owns(self, module):
        return isinstance(module, HiggsLinear)

    def layer_reason(self, cfg, out_features, in_features, dtype):
        return float_and_group_reason(dtype, in_features, cfg.group_size)

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        k = cfg.bits * cfg.p
        words = -(-(in_features // cfg.p) // (32 // k))
        groups = in_features // cfg.group_size
        return (out_features * words * 4 + out_features * groups * DTYPE_BYTES[dtype]
                + 2 ** k * cfg.p * 4 + 8 + cfg.group_size
                + (out_features * DTYPE_BYTES[dtype] if bias else 0))

    def quantize(self, linear, cfg, device):
        w = linear.weight.detach().to(device)
        codes, scales, grid = core.quantize(w, cfg.bits, cfg.p, cfg.group_size, cfg.seed)
        bias = None if linear.bias is None else linear.bias.detach().to(device).clone()
        return HiggsLinear(linear.in_features, linear.out_features, cfg.bits, cfg.p,
                           cfg.group_size, codes, scales.to(w.dtype),
                           grid.to(device).clone(),  # each layer holds its grid, as counted
                           torch.tensor(cfg.seed, dtype=torch.int64, device=device), bias)

    def export_state(self, module):
        tensors = {k: getattr(module, k).detach() for k in ("codes", "scales", "grid", "seed")}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors, {}

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        k = cfg.bits * cfg.p
        words = -(-(in_features // cfg.p) // (32 // k))
        out = {"codes": ((out_features, words), torch.int32),
               "scales": ((out_features, in_features // cfg.group_size), dtype),
               "grid": ((2 ** k, cfg.p), torch.float32), "seed": ((), torch.int64)}
        if bias:
            out["bias"] = ((out_features,), dtype)
        return out

    def state_problems(self, cfg, out_features, in_features, bias, dtype, tensors, meta):
        problems = super().state_problems(cfg, out_features, in_features, bias, dtype, tensors,
                                          meta)
        seed = tensors.get("seed")
        if seed is not None and seed.shape == () and int(seed) != cfg.seed:
            problems.append(f"seed tensor {int(seed)} differs from the config's seed {cfg.seed}")
        return problems

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        t = {k: v.to(device) for k, v in tensors.items()}
        return HiggsLinear(in_features, out_features, cfg.bits, cfg.p, cfg.group_size,
                           t["codes"], t["scales"], t["grid"], t["seed"], t.get("bias"))

    def lora_layers(self):
        # peft refuses HiggsLinear ("Target module HiggsLinear ... is not supported")
        return {HiggsLinear: _higgs_lora_class()}

    def configs(self):
        return [HiggsConfig(bits=b, p=p, group_size=64) for p in (1, 2) for b in (2, 3, 4)]


@functools.cache
def _higgs_lora_class() -> type:
    """A peft LoRA layer around a :class:`HiggsLinear` (peft's conventions for custom layers:
    ``LoraLayer`` + ``update_layer``): the frozen HIGGS output plus the adapter's. Gradients
    reach the adapter through the HIGGS matmul. Merging is refused: it would re-quantize the
    layer, and the merged weights would not be the ones scored."""
    from peft.tuners.lora import LoraLayer

    class HiggsLoraLinear(nn.Module, LoraLayer):
        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            if config.lora_bias:
                raise ValueError("HIGGS layers do not take lora_bias")
            if config.use_dora:
                raise ValueError("HIGGS layers do not take DoRA (it needs the dense weight)")
            super().__init__()
            with warnings.catch_warnings():  # "Unsupported layer type": this class supports it
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
            # peft moves an adapter to its base layer's ``weight``; a HIGGS layer has codes
            self.to(base_layer.codes.device)

        def forward(self, x, *args, **kwargs):
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                y = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
                result = result + (y * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, safe_merge=False, adapter_names=None):
            from ._lora import MERGE_REFUSED

            raise ValueError(MERGE_REFUSED.format(what="HIGGS"))

        def unmerge(self):
            return None  # never merged: nothing to undo (fuse_lora's undo reaches every layer)

        def __repr__(self):
            return "lora." + super().__repr__()

    HiggsLoraLinear.__module__, HiggsLoraLinear.__qualname__ = __name__, "HiggsLoraLinear"
    return HiggsLoraLinear
