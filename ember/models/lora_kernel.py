"""Fused LoRA for decode-sized batches on CUDA: y += B (A x) in one Triton kernel per projection.

The unfused path (`LoraLinear` without it) runs two small GEMMs per projection; at decode batch sizes each is
a latency-bound launch, 504 of them per step for seven projections of 36 layers. This kernel computes the
rank-r projection and its expansion in one launch and adds into y in place. Ranks are zero-padded to a power
of two >= 16 (the slots allocate that), the low-rank activations are rounded to the input dtype as in the
unfused path, and the sum is accumulated in fp32. Optional: without Triton (CPU, CI) nothing here is used.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused path serves
    triton = None

MAX_ROWS = 64  # above this (prefill), the unfused GEMMs are efficient and are used instead
MAX_IN_FEATURES = 4096  # wider inputs (down_proj) make the kernel's serial reduction slower than two GEMMs


def available() -> bool:
    """True where the fused kernel can run (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def padded_rank(rank: int) -> int:
    """The slot rank the kernel needs: a power of two, at least 16."""
    return max(16, 1 << (rank - 1).bit_length())


if triton is not None:
    @triton.jit
    def _lora_add_kernel(x_ptr, a_ptr, b_ptr, y_ptr, rows_total, in_features, out_features,
                         stride_x, stride_a, stride_b, stride_y,
                         RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        ranks = tl.arange(0, RANK)  # (R,)
        low = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)  # (BM, R) = x A^T
        for start in range(0, in_features, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                        mask=(rows[:, None] < rows_total) & (ks[None, :] < in_features), other=0.0)  # (BM, BK)
            a = tl.load(a_ptr + ranks[:, None] * stride_a + ks[None, :], mask=ks[None, :] < in_features,
                        other=0.0)  # (R, BK)
            low += tl.dot(x, tl.trans(a), input_precision="ieee")
        low = low.to(x_ptr.dtype.element_ty)  # the unfused path rounds x A^T to the input dtype too
        b = tl.load(b_ptr + cols[:, None] * stride_b + ranks[None, :], mask=cols[:, None] < out_features,
                    other=0.0)  # (BN, R)
        delta = tl.dot(low, tl.trans(b), input_precision="ieee")  # (BM, BN)
        where = (rows[:, None] < rows_total) & (cols[None, :] < out_features)
        y_at = y_ptr + rows[:, None] * stride_y + cols[None, :]
        y = tl.load(y_at, mask=where, other=0.0).to(tl.float32)
        tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=where)


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block_n: int = 64,
              block_k: int = 512, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """y (M, out) += (x (M, in) @ a (R, in)^T) @ b (out, R)^T in place, R a power of two >= 16.

    The default tile sizes were the fastest of a sweep on the H100 (bf16, 1 and 8 rows, the 4B shape's
    projections): about 5 us a projection against about 9 us for the two GEMMs."""
    rows, in_features = x.shape
    out_features, rank = b.shape
    block_m = 16
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m))
    _lora_add_kernel[grid](x, a, b, y, rows, in_features, out_features, x.stride(0), a.stride(0), b.stride(0),
                           y.stride(0), RANK=rank, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
                           num_warps=num_warps, num_stages=num_stages)
    return y
