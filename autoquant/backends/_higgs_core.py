"""HIGGS core (Malinovskii et al., "Pushing the Limits of LLM Quantization via the Linearity
Theorem"): random Hadamard rotation of each weight group, then nearest-point coding on a grid that
is MSE-optimal for a standard Gaussian.

- ``grid(bits, p)``: 2**(bits*p) points in p dimensions (p=1: Lloyd-Max levels, p=2: a 2-D
  codebook), computed by this project with Lloyd/k-means on 2**18 Gaussian samples (fixed seed)
  and shipped in ``higgs_grids.safetensors`` (3 KB; ``_lloyd`` recomputes them, a test checks
  they are equal); no library provides them here.
- ``rotate(x, signs)``: x -> H·diag(signs)·x per group (H the normalized Walsh-Hadamard matrix,
  fast transform, O(g log g)); the rotation is its own inverse up to the sign flips, and only the
  seed of the signs is stored.
- ``quantize(w, ...)`` returns packed codes (k = bits*p bits per code, 32//k codes per int32 word,
  along the input dimension), one scale per group, and the grid.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

GRIDS = Path(__file__).with_name("higgs_grids.safetensors")


@functools.lru_cache(maxsize=None)
def grid(bits: int, p: int) -> torch.Tensor:
    """[2**(bits*p), p] float32, MSE-optimal for N(0, I_p) (Lloyd / k-means, deterministic),
    as shipped with the package."""
    from safetensors.torch import load_file

    return load_file(str(GRIDS))[f"b{bits}-p{p}"]


def _lloyd(bits: int, p: int) -> torch.Tensor:
    n = 2 ** (bits * p)
    gen = torch.Generator().manual_seed(1234 + 17 * bits + p)
    samples = torch.randn(2 ** 18, p, generator=gen, dtype=torch.float64)
    if p == 1:  # start from Gaussian quantiles
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        points = (math.sqrt(2) * torch.erfinv(2 * q - 1))[:, None]
    else:
        points = samples[torch.randperm(len(samples), generator=gen)[:n]].clone()
    for _ in range(60 if p == 1 else 40):
        assign = torch.cdist(samples, points).argmin(1)
        sums = torch.zeros_like(points).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=n).clamp(min=1)[:, None]
        points = torch.where(counts > 0, sums / counts, points)
    order = torch.argsort(points[:, 0] + 1e-3 * (points[:, 1] if p > 1 else 0))
    return points[order].float().contiguous()


def signs(group_size: int, seed: int, device=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (group_size,), generator=gen) * 2 - 1
    return s.to(device=device, dtype=torch.float32)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform over the last dim (a power of two)."""
    g = x.shape[-1]
    shape = x.shape
    y = x.reshape(-1, g)
    h = 1
    while h < g:
        y = y.view(-1, g // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(g))


@functools.lru_cache(maxsize=64)
def _rotation_matrix(group_size: int, sign_bytes: bytes, device: str, dtype: torch.dtype):
    sign = torch.frombuffer(bytearray(sign_bytes), dtype=torch.int8).float()
    h = fwht(torch.eye(group_size)) * sign[None, :]  # H · diag(sign)
    return h.t().contiguous().to(device=device, dtype=dtype)  # rows @ R^T


def rotate(x: torch.Tensor, sign: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of ``group_size`` along the last dim: H · diag(sign) · x.

    Done as one small matmul per group with the g x g matrix H·diag(sign) (built from the signs,
    cached per group size, seed, device and dtype -- 8 KB at g=64 in bf16, shared by every layer
    with that seed): faster than a butterfly on both CPU and GPU."""
    shape = x.shape
    if torch.compiler.is_compiling():  # traceable, and inductor fuses the butterfly
        return fwht(x.reshape(-1, group_size) * sign.to(x.dtype)).reshape(shape)
    rot = _rotation_matrix(group_size, sign.to(torch.int8).cpu().numpy().tobytes(),
                           str(x.device), x.dtype)
    return (x.reshape(-1, group_size) @ rot).reshape(shape)


def codes_per_word(bits: int, p: int) -> int:
    return 32 // (bits * p)


def pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, n] integer codes of k bits -> [rows, ceil(n / (32//k))] int32 (low bits first)."""
    cpw = 32 // k
    rows, n = codes.shape
    words = -(-n // cpw)
    padded = torch.zeros(rows, words * cpw, dtype=torch.int64, device=codes.device)
    padded[:, :n] = codes
    padded = padded.view(rows, words, cpw)
    shifts = (torch.arange(cpw, device=codes.device) * k).view(1, 1, cpw)
    packed = (padded << shifts).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    cpw = 32 // k
    shifts = (torch.arange(cpw, device=packed.device) * k).view(1, 1, cpw)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << k) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :n]


def quantize(w: torch.Tensor, bits: int, p: int, group_size: int, seed: int):
    """``(packed codes int32 [out, words], scales [out, in/g] float32, grid [n, p])``."""
    out_f, in_f = w.shape
    sign = signs(group_size, seed, w.device)
    r = rotate(w.float(), sign, group_size).view(out_f, in_f // group_size, group_size)
    scale = r.pow(2).mean(-1).sqrt().clamp(min=1e-8)  # a rotated group is ~N(0, scale^2)
    z = (r / scale[..., None]).reshape(out_f, in_f // p, p)
    pts = grid(bits, p).to(w.device)
    codes = torch.empty(out_f, in_f // p, dtype=torch.int64, device=w.device)
    for i in range(0, out_f, 256):  # bounded memory for the distance matrix
        d = torch.cdist(z[i:i + 256].reshape(-1, p), pts)
        codes[i:i + 256] = d.argmin(-1).view(-1, in_f // p)
    return pack(codes, bits * p), scale, pts


def dequantize_rotated(packed, scale, pts, bits, p, group_size, in_features, dtype):
    """The rotated weight (what multiplies rotated activations), [out, in] in ``dtype``."""
    out_f = packed.shape[0]
    codes = unpack(packed, bits * p, in_features // p)
    vals = pts.to(scale.device)[codes].reshape(out_f, in_features // group_size, group_size)
    return (vals * scale[..., None].float()).reshape(out_f, in_features).to(dtype)
