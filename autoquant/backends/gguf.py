"""``gguf``: the block formats of GGUF files (llama.cpp / ggml), the files ComfyUI-GGUF,
stable-diffusion.cpp and diffusers' ``GGUFQuantizationConfig`` load.

- **Quantized by ggml itself**: ``ggml_quantize_chunk`` of the PyPI package ``ggml-python``
  (its pinned ggml), on row chunks in threads (ctypes releases the GIL), so a layer's codes are
  bit-identical to what that ggml writes for the same float32 rows. ggml checks no row length
  (a K-quant of a 96-wide row returns garbage): every shape is checked here first.
- **Run as the loaders run it**: the layer *is* diffusers' ``GGUFLinear`` holding a
  ``GGUFParameter`` (the raw blocks, ``uint8``), dequantized by diffusers' own torch code at each
  call -- the arithmetic of a GGUF file loaded by ``from_single_file``, so a scored image is the
  image the exported file makes.
- **Bytes**: ``out_features * in_features / block * block_bytes`` (GGUF's block sizes, e.g.
  Q4_K 144 B per 256 weights, Q8_0 34 B per 32) + the bias in the layer's dtype.
- **Importance matrix** (``imatrix: true``): llama.cpp's imatrix -- the per-input-channel mean
  square of the layer's inputs, the diagonal of the calibration Hessian autoquant collects --
  handed to ggml, which then weights each code's error by it. It changes which codes are chosen,
  never the format: the file stays a plain GGUF.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from .._errors import ConfigError
from ._base import DTYPE_BYTES, Backend, QuantConfig, check_choice

#: GGUF type -> (ggml type id, weights per block, bytes per block); ids are ggml's enum
#: (``gguf.GGMLQuantizationType``), sizes ``gguf.GGML_QUANT_SIZES`` -- both checked by the tests
TYPES = {
    "Q8_0": (8, 32, 34), "Q6_K": (14, 256, 210), "Q5_K": (13, 256, 176), "Q5_1": (7, 32, 24),
    "Q5_0": (6, 32, 22), "Q4_K": (12, 256, 144), "Q4_1": (3, 32, 20), "Q4_0": (2, 32, 18),
    "Q3_K": (11, 256, 110), "Q2_K": (10, 256, 84), "IQ4_NL": (20, 32, 18),
    "IQ4_XS": (23, 256, 136),
}
#: rows quantized per ggml call (a thread's unit of work)
CHUNK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class GGUFConfig(QuantConfig):
    """``{method: gguf, type: Q4_K, imatrix: false}``; ``imatrix: true`` weights ggml's rounding by
    the layer's calibration activations (search and apply collect them)."""

    method = "gguf"
    type: str = "Q4_K"
    imatrix: bool = False

    def __post_init__(self):
        check_choice("type", self.type, tuple(TYPES), method=self.method)
        check_choice("imatrix", self.imatrix, (False, True), method=self.method)

    @property
    def block(self) -> tuple[int, int]:
        """(weights, bytes) of one block."""
        return TYPES[self.type][1:]

    @property
    def nominal_bits(self) -> float:
        weights, nbytes = self.block
        return 8 * nbytes / weights

    @property
    def label(self) -> str:
        return f"gguf-{self.type.lower()}" + ("-imat" if self.imatrix else "")


def _ggml():
    from .._quiet import import_quietly

    return import_quietly("ggml")


def quantize_rows(w: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """ggml's codes of the float32 rows ``w`` ``[rows, n]`` as ``uint8 [rows, n / block *
    bytes]`` (``imatrix``: ``[n]`` float32, or None). The shape is checked here: ggml does not."""
    ggml = _ggml()
    type_id, weights, nbytes = TYPES[type_name]
    rows, n = w.shape
    if n % weights:
        raise ValueError(f"{type_name} quantizes rows of a multiple of {weights} weights, "
                         f"not {n}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise ValueError(f"an importance matrix for rows of {n} holds {n} values, "
                             f"not {imatrix.shape}")
    out = np.zeros((rows, n // weights * nbytes), dtype=np.uint8)
    row_bytes = out.shape[1]
    src = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    imat = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if imatrix is not None else None
    base = out.ctypes.data

    def chunk(r0: int) -> int:
        r = min(CHUNK_ROWS, rows - r0)
        # ggml writes row r0 at dst + r0 * row_bytes, reading src from element r0 * n
        return ggml.ggml_quantize_chunk(type_id, src, ctypes.c_void_p(base), r0 * n, r, n, imat)

    starts = range(0, rows, CHUNK_ROWS)
    workers = threads or min(len(starts), torch.get_num_threads(), os.cpu_count() or 1)
    if workers <= 1:
        written = sum(chunk(r0) for r0 in starts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            written = sum(pool.map(chunk, starts))
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes of {type_name} codes, "
                           f"{out.nbytes} expected")
    return out


def imatrix_of(linear: nn.Module) -> np.ndarray | None:
    """llama.cpp's importance matrix of ``linear``: the mean square of each input channel over
    the calibration generation (the diagonal of its input Hessian), or None if never calibrated."""
    from ._hessians import hessian

    h = hessian(linear)
    return None if h is None else torch.diagonal(h).float().clamp(min=0).numpy().copy()


def _layer(cfg: GGUFConfig, codes: torch.Tensor, bias: torch.Tensor | None, in_features: int,
           out_features: int, dtype: torch.dtype, device) -> nn.Module:
    """diffusers' ``GGUFLinear`` holding ``codes`` -- the module ``from_single_file`` builds."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    with torch.device("meta"):
        layer = GGUFLinear(in_features, out_features, bias=bias is not None, compute_dtype=dtype)
    layer.weight = GGUFParameter(codes.to(device), quant_type=TYPES[cfg.type][0])
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
    layer.device = torch.device(device)
    return layer.requires_grad_(False)


class GGUFBackend(Backend):
    name = "gguf"
    config_cls = GGUFConfig
    devices = ("cpu", "cuda")
    package = ("ggml", "ggml-python")
    loggers = ("gguf",)
    compile_reason = ("diffusers' GGUFParameter is a tensor subclass dispatching through "
                      "__torch_function__; the loaders run it eagerly")

    def unavailable_reason(self, cfg, device):
        if importlib.util.find_spec("gguf") is None:
            return "gguf is not installed: pip install gguf (diffusers' GGUF layers need it)"
        return super().unavailable_reason(cfg, device)

    def needs_calibration(self, cfg) -> bool:
        return cfg.imatrix

    def timing_config(self, cfg):
        return dataclasses.replace(cfg, imatrix=False)  # the same blocks, no data needed

    def owns(self, module):
        return type(module).__name__ == "GGUFLinear" and \
            type(module).__module__.startswith("diffusers.quantizers.gguf")

    def lora_layers(self):
        from diffusers.quantizers.gguf.utils import GGUFLinear
        from peft.tuners.lora.layer import Linear

        from ._lora import refusing_merge

        # peft's own Linear LoRA (GGUFLinear is an nn.Linear), merging refused: peft would add
        # the update to the packed bytes
        return {GGUFLinear: refusing_merge(Linear, "GGUF")}

    def layer_reason(self, cfg, out_features, in_features, dtype):
        if dtype not in DTYPE_BYTES:
            return f"dtype {dtype} is not a float type GGUF's layers compute in"
        weights = cfg.block[0]
        if in_features % weights:
            return (f"in_features={in_features} is not a multiple of {weights}, the row block "
                    f"of {cfg.type}")
        return None

    def nbytes(self, cfg, out_features, in_features, bias, dtype):
        weights, nbytes = cfg.block
        return (out_features * (in_features // weights) * nbytes
                + (out_features * DTYPE_BYTES[dtype] if bias else 0))

    def quantize(self, linear, cfg, device):
        imatrix = None
        if cfg.imatrix:
            imatrix = imatrix_of(linear)
            if imatrix is None:
                raise RuntimeError(
                    "no calibration data for this layer: an imatrix GGUF config needs its "
                    "inputs' mean squares -- autoquant.calibrate(pipe, settings, layers) first "
                    "(search and apply do it)")
        w = linear.weight.detach().to("cpu", torch.float32).numpy()
        codes = torch.from_numpy(quantize_rows(w, cfg.type, imatrix))
        return _layer(cfg, codes, linear.bias, linear.in_features, linear.out_features,
                      linear.weight.dtype, device)

    def export_state(self, module):
        tensors = {"blocks": module.weight.as_tensor().detach()}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors, {}

    def expected_tensors(self, cfg, out_features, in_features, bias, dtype):
        weights, nbytes = cfg.block
        out = {"blocks": ((out_features, in_features // weights * nbytes), torch.uint8)}
        if bias:
            out["bias"] = ((out_features,), dtype)
        return out

    def import_state(self, cfg, out_features, in_features, bias, dtype, tensors, meta, device):
        return _layer(cfg, tensors["blocks"], tensors.get("bias"), in_features, out_features,
                      dtype, device)

    def formats(self, cfg):
        # its blocks, byte for byte; in a diffusers folder the denoiser is one such GGUF file
        return {**super().formats(cfg), "gguf": cfg.type, "diffusers": "gguf"}  # the file format

    def configs(self):
        return [GGUFConfig(type=t) for t in TYPES]


def check_types() -> None:
    """The table above against gguf-py's (raises ConfigError on a mismatch)."""
    import gguf

    for name, (type_id, weights, nbytes) in TYPES.items():
        t = gguf.GGMLQuantizationType[name]
        if int(t) != type_id or tuple(gguf.GGML_QUANT_SIZES[t]) != (weights, nbytes):
            raise ConfigError(f"GGUF type {name}: autoquant has id {type_id}, block "
                              f"{(weights, nbytes)}; gguf-py has {int(t)}, "
                              f"{gguf.GGML_QUANT_SIZES[t]}")


__all__ = ["GGUFConfig", "GGUFBackend", "TYPES", "quantize_rows", "imatrix_of", "check_types"]
