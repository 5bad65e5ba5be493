"""Fused gather + weighted Gram / cross-Gram accumulation for the closed-form edit.

Math. Given a source table `src` (Ns, D), a target table `tgt` (Nt, D), row indices
`src_index`, `tgt_index` (N,) and weights `weight` (N,), let

    s_i = src[src_index[i]],    t_i = tgt[tgt_index[i]]         (D-vectors)

and return the two (D, D) float32 matrices

    S = sum_i w_i s_i s_i^T  = Sg^T diag(w) Sg
    C = sum_i w_i t_i s_i^T  = Tg^T diag(w) Sg

with Sg = src[src_index], Tg = tgt[tgt_index] (N, D). S is the weighted Gram of the edited
embeddings and C their cross-Gram with the targets; the edit then solves T = C S^-1.

Layout. The tables are 2-D tensors addressed through their strides (any layout works); a
row is one token embedding, e.g. a row of prompt embeddings flattened to
(B*77, D). `src` and `tgt` may be the very same tensor. The indices are int64 and may repeat.
Tables and weights may be fp32 / fp16 / bf16 (fp64 is read and rounded to fp32); everything
is upcast to fp32 in registers and accumulated in fp32. Outputs are contiguous fp32 (D, D).

Kernel. One program owns an output block S[I, J] and C[I, J] (I, J: BLOCK_D-wide column
ranges of the embedding) and walks over the N selected rows BLOCK_N at a time. Per step it
gathers, straight from the tables by index (Sg and Tg are never materialised),

    A = src[idx_s, I] * w     (BLOCK_N, BLOCK_D)   weighted source, I columns
    B = tgt[idx_t, I] * w     (BLOCK_N, BLOCK_D)   weighted target, I columns
    X = src[idx_s, J]         (BLOCK_N, BLOCK_D)   source, J columns

and accumulates S[I, J] += A^T X and C[I, J] += B^T X: the source tile X is loaded once and
feeds both outputs (the fusion).

Backward is plain torch (it is a handful of (N, D) x (D, D) products):

    dSg = diag(w) Sg (dS + dS^T) + diag(w) Tg dC
    dTg = diag(w) Sg dC^T
    dw_i = s_i^T dS s_i + t_i^T dC s_i

scattered back into the tables with index_add_ in fp32 (repeated indices add up). When `src`
and `tgt` are the same tensor, both scatters go into one buffer, returned as that tensor's
gradient (None for the second argument: autograd would add the two, rounding each first).
"""

from __future__ import annotations

import torch

from ._dispatch import triton_importable, use_triton

_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

if triton_importable():  # the module must import (and the torch reference work) without triton
    import triton
    import triton.language as tl

    @triton.jit  # long: the gather, the tile loop and both accumulators are one fused launch
    def _weighted_gram_kernel(
        src_ptr,  # *src table (Ns, D), any float dtype
        tgt_ptr,  # *tgt table (Nt, D), any float dtype (may alias src_ptr)
        w_ptr,  # *weights (N,), contiguous, any float dtype
        sidx_ptr,  # *int64 source row indices (N,), contiguous
        tidx_ptr,  # *int64 target row indices (N,), contiguous
        s_out_ptr,  # *S output (D, D), contiguous, fp32 or fp64 (as ACC_FP64)
        c_out_ptr,  # *C output (D, D), contiguous, fp32 or fp64 (as ACC_FP64)
        N,  # number of selected rows
        D,  # embedding width
        stride_sn,  # src stride between rows (elements)
        stride_sd,  # src stride between columns (elements)
        stride_tn,  # tgt stride between rows (elements)
        stride_td,  # tgt stride between columns (elements)
        BLOCK_D: tl.constexpr,  # output block is BLOCK_D x BLOCK_D (>= 16 for tl.dot)
        BLOCK_N: tl.constexpr,  # rows gathered per step of the reduction (>= 16 for tl.dot)
        ACC_FP64: tl.constexpr,  # True: fp64 products and sums (FMA, no tensor cores); False: fp32 tl.dot
    ):
        pid_i = tl.program_id(0)  # block row of S / C (the "outer" side: s_i or t_i)
        pid_j = tl.program_id(1)  # block column of S / C (the shared source side)
        offs_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_i = offs_i < D  # D need not be a multiple of BLOCK_D
        mask_j = offs_j < D

        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        acc_s = tl.zeros((BLOCK_D, BLOCK_D), dtype=acc_dtype)
        acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=acc_dtype)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            # Padding rows get index 0 and weight 0, and their loads are masked off as well.
            idx_s = tl.load(sidx_ptr + offs_n, mask=mask_n, other=0)
            idx_t = tl.load(tidx_ptr + offs_n, mask=mask_n, other=0)
            w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)

            # Gather: row offsets come from the indices (int64, so huge tables cannot overflow).
            src_rows = src_ptr + idx_s[:, None] * stride_sn
            tgt_rows = tgt_ptr + idx_t[:, None] * stride_tn
            m_ni = mask_n[:, None] & mask_i[None, :]
            m_nj = mask_n[:, None] & mask_j[None, :]
            x = tl.load(src_rows + offs_j[None, :] * stride_sd, mask=m_nj, other=0.0).to(acc_dtype)
            a = tl.load(src_rows + offs_i[None, :] * stride_sd, mask=m_ni, other=0.0).to(acc_dtype)
            b = tl.load(tgt_rows + offs_i[None, :] * stride_td, mask=m_ni, other=0.0).to(acc_dtype)
            a = a * w[:, None]
            b = b * w[:, None]
            if ACC_FP64:
                # The solve amplifies the Gram's rounding by its condition number (up to ~1e8),
                # so the default path sums exact fp64 products: outer products reduced over rows.
                acc_s += tl.sum(a[:, :, None] * x[:, None, :], axis=0)
                acc_c += tl.sum(b[:, :, None] * x[:, None, :], axis=0)
            else:
                # Tiles are fp32 before tl.dot: bf16 dots are wrong in the interpreter, and "ieee"
                # keeps full fp32 on GPUs (TF32 would cost ~3 digits the edit's solve needs).
                acc_s = tl.dot(tl.trans(a), x, acc_s, input_precision="ieee")
                acc_c = tl.dot(tl.trans(b), x, acc_c, input_precision="ieee")

        out_offs = offs_i[:, None] * D + offs_j[None, :]
        out_mask = mask_i[:, None] & mask_j[None, :]
        tl.store(s_out_ptr + out_offs, acc_s, mask=out_mask)
        tl.store(c_out_ptr + out_offs, acc_c, mask=out_mask)


def _check_inputs(src, tgt, weight, src_index, tgt_index) -> None:
    """Raise a ValueError naming the first problem with the inputs of weighted_gram."""
    named = {"src": src, "tgt": tgt, "weight": weight, "src_index": src_index, "tgt_index": tgt_index}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"weighted_gram: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"weighted_gram: all inputs must be on one device, got {devices}")
    for name in ("src", "tgt"):
        t = named[name]
        if t.dim() != 2:
            raise ValueError(f"weighted_gram: {name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
        if t.dtype not in _TABLE_DTYPES:
            raise ValueError(f"weighted_gram: {name} must be fp32/fp16/bf16 (or fp64), got {t.dtype}")
    if src.shape[1] != tgt.shape[1]:
        raise ValueError(
            f"weighted_gram: src and tgt must have the same width D, got {src.shape[1]} and {tgt.shape[1]}"
        )
    for name in ("src_index", "tgt_index"):
        t = named[name]
        if t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(
                f"weighted_gram: {name} must be a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}"
            )
    n = src_index.shape[0]
    if tgt_index.shape[0] != n:
        raise ValueError(
            f"weighted_gram: src_index and tgt_index must have the same length, got {n} and {tgt_index.shape[0]}"
        )
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weighted_gram: weight must have shape ({n},), got {tuple(weight.shape)}")
    if weight.dtype not in _TABLE_DTYPES:
        raise ValueError(f"weighted_gram: weight must be fp32/fp16/bf16 (or fp64), got {weight.dtype}")
    if n == 0:
        return
    # One min/max per index (one host sync): an out-of-range index would read outside the table.
    for name, idx, rows in (("src_index", src_index, src.shape[0]), ("tgt_index", tgt_index, tgt.shape[0])):
        lo, hi = torch.stack([idx.min(), idx.max()]).tolist()
        if lo < 0 or hi >= rows:
            raise ValueError(
                f"weighted_gram: {name} must lie in [0, {rows}) (rows of its table), got values in [{lo}, {hi}]"
            )


def _block_sizes(d: int, acc_fp64: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): fixed by the launcher (no autotune: it needs a GPU to benchmark on)."""
    if acc_fp64:
        # The (BLOCK_N, BLOCK_D, BLOCK_D) fp64 product tile must stay small: 8 x 32 x 32.
        return min(32, max(16, triton.next_power_of_2(d))), 8
    # tl.dot needs every tile side >= 16. Two 64 x 64 fp32 accumulators are 64 registers a thread
    # over 4 warps; not tuned on hardware.
    return min(64, max(16, triton.next_power_of_2(d))), 32


def _launch_weighted_gram(
    src, tgt, weight, src_index, tgt_index, out_dtype=torch.float32, check=True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel; returns (S, C), both (D, D) contiguous in out_dtype (fp32 or fp64).

    check=False skips the input checks, for callers that just ran them (they cost a host sync).
    """
    if check:
        _check_inputs(src, tgt, weight, src_index, tgt_index)
    n, d = src_index.shape[0], src.shape[1]
    S = torch.zeros((d, d), dtype=out_dtype, device=src.device)
    C = torch.zeros((d, d), dtype=out_dtype, device=src.device)
    if n == 0 or d == 0:  # empty sums: nothing to launch
        return S, C
    acc_fp64 = out_dtype == torch.float64
    block_d, block_n = _block_sizes(d, acc_fp64)
    grid = (triton.cdiv(d, block_d), triton.cdiv(d, block_d))
    _weighted_gram_kernel[grid](
        src,
        tgt,
        weight.contiguous(),
        src_index.contiguous(),
        tgt_index.contiguous(),
        S,
        C,
        n,
        d,
        src.stride(0),
        src.stride(1),
        tgt.stride(0),
        tgt.stride(1),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        ACC_FP64=acc_fp64,
        num_warps=4,
    )
    return S, C


def _scatter(table, *parts) -> torch.Tensor:
    """Gradient of `table`: each (index, rows) pair index_add_-ed into zeros of the rows' dtype, then cast."""
    grad = torch.zeros(table.shape, dtype=parts[0][1].dtype, device=table.device)
    for index, rows in parts:
        grad.index_add_(0, index, rows)  # repeated indices accumulate
    return grad.to(table.dtype)


class _WeightedGram(torch.autograd.Function):
    """Triton forward, torch backward (see the module docstring for the gradient formulas)."""

    @staticmethod
    def forward(ctx, src, tgt, weight, src_index, tgt_index, out_dtype):
        # Only reached through weighted_gram, which has checked the inputs already.
        S, C = _launch_weighted_gram(src, tgt, weight, src_index, tgt_index, out_dtype, check=False)
        ctx.save_for_backward(src, tgt, weight, src_index, tgt_index)
        ctx.same_table = src is tgt  # saved tensors come back as distinct objects, so note it now
        return S, C

    @staticmethod
    def backward(ctx, dS, dC):
        src, tgt, weight, src_index, tgt_index = ctx.saved_tensors
        need_src, need_tgt, need_w = ctx.needs_input_grad[:3]
        # Work in the output's precision (fp32 or fp64) whatever the table dtypes; cast each
        # gradient to its input's dtype at the end.
        acc = dS.dtype
        Sg = src[src_index].to(acc)
        Tg = tgt[tgt_index].to(acc)
        w = weight.to(acc)[:, None]
        # autograd materialises the gradient of an output that did not reach the loss as zeros.
        dS, dC = dS.to(acc), dC.to(acc)

        d_src = d_tgt = d_w = None
        if need_src or need_tgt:
            dSg = w * (Sg @ (dS + dS.T) + Tg @ dC)  # (N, D) gradient of the gathered source rows
            dTg = w * (Sg @ dC.T)  # (N, D) gradient of the gathered target rows
            if ctx.same_table:
                # One table feeds both sides: scatter both into one fp32 buffer and round once
                # (returning two gradients, autograd would round each to the dtype, then add them).
                d_src = _scatter(src, (src_index, dSg), (tgt_index, dTg))
            else:
                d_src = _scatter(src, (src_index, dSg)) if need_src else None
                d_tgt = _scatter(tgt, (tgt_index, dTg)) if need_tgt else None
        if need_w:
            d_w = ((Sg @ dS) * Sg).sum(1) + ((Tg @ dC) * Sg).sum(1)
            d_w = d_w.to(weight.dtype)
        return d_src, d_tgt, d_w, None, None, None


def weighted_gram_reference(
    src, tgt, weight, src_index, tgt_index, out_dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch (S, C): gather, upcast to out_dtype, two matmuls. Differentiable by torch autograd."""
    Sg = src[src_index].to(out_dtype)
    Tg = tgt[tgt_index].to(out_dtype)
    w = weight.to(out_dtype)[:, None]
    S = (Sg * w).T @ Sg
    C = (Tg * w).T @ Sg
    return S, C


def weighted_gram(
    src, tgt, weight, src_index, tgt_index, *, out_dtype=torch.float32, backend="auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Sg^T diag(w) Sg and C = Tg^T diag(w) Sg, with Sg = src[src_index], Tg = tgt[tgt_index].

    src (Ns, D), tgt (Nt, D) (may be the same tensor), weight (N,), src_index / tgt_index (N,)
    int64. Returns (S, C), both (D, D) in out_dtype: torch.float32 (fp32 tl.dot, fast) or
    torch.float64 (fp64 products and sums, for ill-conditioned solves). Differentiable wrt src,
    tgt and weight. backend: "auto" (Triton where it can run, else torch), "triton" or "torch".
    """
    # Checked before dispatch, so both backends raise the same ValueErrors.
    _check_inputs(src, tgt, weight, src_index, tgt_index)
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"weighted_gram: out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    if use_triton(backend, src, tgt, weight, src_index, tgt_index):
        return _WeightedGram.apply(src, tgt, weight, src_index, tgt_index, out_dtype)
    return weighted_gram_reference(src, tgt, weight, src_index, tgt_index, out_dtype)
