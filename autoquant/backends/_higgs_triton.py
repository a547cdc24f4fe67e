"""HIGGS on the GPU. Few tokens: one Triton kernel multiplies rotated activations by the packed
weight, decoding codes through the grid in registers (the weight is never materialized). Many
tokens (a diffusion step: thousands): a Triton kernel decodes the weight once into a transient bf16
buffer and cuBLAS multiplies -- decoding inside the matmul would repeat it for every row block.

Each program computes a [BLOCK_M, BLOCK_N] output tile; per K step it loads the int32 words that
hold the tile's codes, shifts and masks each code out, looks it up in the grid (a few KB, cached),
multiplies by the group scale and feeds the bf16 tile to tensor cores (``tl.dot``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:
    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8,
                               num_stages=3),
                 triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4,
                               num_stages=3),
                 triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4,
                               num_stages=2)],
        key=["M", "N", "K"])
    @triton.jit
    def _higgs_mm(x_ptr, codes_ptr, grid_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                  words_per_row, groups_per_row, stride_xm, stride_om,
                  HAS_BIAS: tl.constexpr, KBITS: tl.constexpr, CPW: tl.constexpr,
                  P: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            idx = offs_k // P
            word = idx // CPW
            shift = (idx % CPW) * KBITS
            bmask = (offs_n[None, :] < N) & (offs_k[:, None] < K)
            w = tl.load(codes_ptr + offs_n[None, :] * words_per_row + word[:, None], mask=bmask,
                        other=0)
            code = (w >> shift[:, None]) & ((1 << KBITS) - 1)
            val = tl.load(grid_ptr + code * P + (offs_k % P)[:, None])
            s = tl.load(scale_ptr + offs_n[None, :] * groups_per_row + (offs_k // G)[:, None],
                        mask=bmask, other=0.0).to(tl.float32)
            acc += tl.dot(a, (val * s).to(tl.bfloat16))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


if triton is not None:
    @triton.jit
    def _higgs_decode(codes_ptr, grid_ptr, scale_ptr, out_ptr, N, K, words_per_row,
                      groups_per_row, KBITS: tl.constexpr, CPW: tl.constexpr, P: tl.constexpr,
                      G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        idx = offs_k // P
        w = tl.load(codes_ptr + offs_n[:, None] * words_per_row + (idx // CPW)[None, :],
                    mask=mask, other=0)
        code = (w >> ((idx % CPW) * KBITS)[None, :]) & ((1 << KBITS) - 1)
        val = tl.load(grid_ptr + code * P + (offs_k % P)[None, :])
        s = tl.load(scale_ptr + offs_n[:, None] * groups_per_row + (offs_k // G)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], (val * s).to(tl.bfloat16),
                 mask=mask)


#: from this many rows of activations on, decoding the weight once and using cuBLAS beats
#: decoding it again in every row block of the fused kernel
FUSED_MAX_ROWS = 256


def decode(codes, grid, scales, bits, p, group_size, out_features, in_features):
    """The rotated weight [out, in] in bf16, decoded by one Triton kernel."""
    out = torch.empty(out_features, in_features, device=codes.device, dtype=torch.bfloat16)
    k = bits * p
    grid_fn = (triton.cdiv(out_features, 64), triton.cdiv(in_features, 128))
    _higgs_decode[grid_fn](codes, grid, scales, out, out_features, in_features, codes.shape[1],
                           scales.shape[1], KBITS=k, CPW=32 // k, P=p, G=group_size,
                           BLOCK_N=64, BLOCK_K=128)
    return out


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dtype == torch.bfloat16


def matmul(x_rot: torch.Tensor, codes, grid, scales, bias, bits: int, p: int, group_size: int,
           out_features: int) -> torch.Tensor:
    """``x_rot @ W_rot.T (+ bias)`` with W_rot decoded on the fly. x_rot: [..., K] bf16 CUDA."""
    shape = x_rot.shape
    x2 = x_rot.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    if M >= FUSED_MAX_ROWS:  # many tokens (diffusion): decode once, then cuBLAS
        w = decode(codes, grid, scales, bits, p, group_size, out_features, K)
        out = torch.nn.functional.linear(x2, w, bias)
        return out.reshape(*shape[:-1], out_features)
    out = torch.empty(M, out_features, device=x2.device, dtype=torch.bfloat16)
    k = bits * p

    def launch(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))

    _higgs_mm[launch](x2, codes, grid, scales, bias if bias is not None else scales, out, M,
                      out_features, K, codes.shape[1], scales.shape[1], x2.stride(0),
                      out.stride(0), HAS_BIAS=bias is not None, KBITS=k, CPW=32 // k, P=p,
                      G=group_size)
    return out.reshape(*shape[:-1], out_features)
