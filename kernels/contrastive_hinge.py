"""Fused contrastive hinge of TRCE stage 2: both distances, the hinge and its gradient, one pass.

Math. For sample b with the trainee's anchor prediction A[b, :] (N elements), the safe target
S[b, :] and the unsafe target U[b, :] (both built from frozen predictions with guidance), a
scale beta and a margin delta:

    d_safe[b]   = (1 / N) sum_n (A - S)^2
    d_unsafe[b] = (1 / N) sum_n (A - U)^2
    loss[b]     = max(0, beta (d_safe[b] - d_unsafe[b] + delta))
    dloss[b] / dA[b, n] = beta (2 / N) (U - S)   where the hinge is active, else 0

(the A terms cancel in the gradient: (A - S) - (A - U) = U - S). TRCE applies it to two anchors,
eps_theta(x, t, c_malicious) and eps_theta(x, t, ""); stack them along B for one launch.

Layout. ``anchor``, ``safe``, ``unsafe`` (B, N), contiguous in N; fp32 / fp16 / bf16, fp32
arithmetic. Output ``loss`` (B,) fp32.

Kernel. Grid (B, cdiv(N, BLOCK)): each program reads one BLOCK of the three inputs once and
writes partial sums of both distances, and (when the anchor needs a gradient) that block of
beta (2 / N) (U - S); the launcher sums the partials, applies the hinge, and the backward
multiplies the stored direction by d_loss[b] times the hinge's 0/1 gate.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_importable, use_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if triton_importable():  # the module must import (and the torch reference work) without triton
    import triton
    import triton.language as tl

    @triton.jit
    def _contrastive_hinge_kernel(
        anchor_ptr,  # *trainee prediction (B, N)
        safe_ptr,  # *safe target (B, N)
        unsafe_ptr,  # *unsafe target (B, N)
        dir_ptr,  # *out: beta (2/N) (U - S) (B, N), anchor's dtype; unused unless WRITE_GRAD
        partial_ptr,  # *out fp32 (B, 2, n_blocks): partial sums of (A-S)^2 and (A-U)^2
        N,  # elements per sample
        n_blocks,  # cdiv(N, BLOCK)
        beta,  # hinge scale
        stride_ab,  # anchor stride between samples
        stride_sb,  # safe stride between samples
        stride_ub,  # unsafe stride between samples
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,  # elements per program
    ):
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        a = tl.load(anchor_ptr + b * stride_ab + offs, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(safe_ptr + b * stride_sb + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(unsafe_ptr + b * stride_ub + offs, mask=valid, other=0.0).to(tl.float32)
        to_safe = a - s
        to_unsafe = a - u
        tl.store(partial_ptr + (b * 2) * n_blocks + blk, tl.sum(to_safe * to_safe, axis=0))
        tl.store(partial_ptr + (b * 2 + 1) * n_blocks + blk, tl.sum(to_unsafe * to_unsafe, axis=0))
        if WRITE_GRAD:
            direction = (u - s) * (2.0 * beta / N)
            tl.store(dir_ptr + b * N + offs, direction.to(dir_ptr.dtype.element_ty), mask=valid)


def _check_inputs(anchor, safe, unsafe, beta, delta) -> None:
    """Raise a ValueError naming the first problem with contrastive_hinge's inputs."""
    for name, t in (("anchor", anchor), ("safe", safe), ("unsafe", unsafe)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"contrastive_hinge: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"contrastive_hinge: {name} must be fp32/fp16/bf16, got {t.dtype}")
        if t.device != anchor.device:
            raise ValueError(f"contrastive_hinge: {name} is on {t.device}, anchor on {anchor.device}")
    if anchor.dim() != 2:
        raise ValueError(f"contrastive_hinge: anchor must be (B, N), got shape {tuple(anchor.shape)}")
    for name, t in (("safe", safe), ("unsafe", unsafe)):
        if t.shape != anchor.shape:
            raise ValueError(f"contrastive_hinge: {name} must have anchor's shape {tuple(anchor.shape)}, "
                             f"got {tuple(t.shape)}")
    if not beta > 0:
        raise ValueError(f"contrastive_hinge: beta must be > 0, got {beta}")
    if not delta >= 0:
        raise ValueError(f"contrastive_hinge: delta must be >= 0, got {delta}")


def _launch(anchor, safe, unsafe, beta: float, write_grad: bool):
    """Run the kernel; returns (d_safe (B,), d_unsafe (B,), direction (B, N) or None)."""
    b, n = anchor.shape
    anchor, safe, unsafe = anchor.contiguous(), safe.contiguous(), unsafe.contiguous()
    if b == 0 or n == 0:
        zeros = torch.zeros(b, device=anchor.device)
        return zeros, zeros.clone(), torch.zeros_like(anchor) if write_grad else None
    block = min(4096, max(128, triton.next_power_of_2(n)))
    n_blocks = triton.cdiv(n, block)
    partial = torch.empty((b, 2, n_blocks), dtype=torch.float32, device=anchor.device)
    direction = torch.empty_like(anchor) if write_grad else None
    _contrastive_hinge_kernel[(b, n_blocks)](
        anchor, safe, unsafe, direction if write_grad else anchor, partial, n, n_blocks, float(beta),
        anchor.stride(0), safe.stride(0), unsafe.stride(0),
        WRITE_GRAD=write_grad, BLOCK=block, num_warps=4,
    )
    sums = partial.sum(2) / n
    return sums[:, 0], sums[:, 1], direction


class _ContrastiveHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, safe, unsafe, beta, delta):
        d_safe, d_unsafe, direction = _launch(anchor, safe, unsafe, beta, write_grad=ctx.needs_input_grad[0])
        margin = beta * (d_safe - d_unsafe + delta)
        active = (margin > 0).float()
        ctx.save_for_backward(direction, active)
        return margin.clamp(min=0)

    @staticmethod
    def backward(ctx, d_loss):
        direction, active = ctx.saved_tensors
        d_anchor = None
        if ctx.needs_input_grad[0]:
            scale = (d_loss.float() * active)[:, None]
            d_anchor = (direction.float() * scale).to(direction.dtype)
        return d_anchor, None, None, None, None


def contrastive_hinge_reference(anchor, safe, unsafe, beta: float = 1.0, delta: float = 0.01) -> torch.Tensor:
    """Pure torch: per-sample max(0, beta (MSE(A, S) - MSE(A, U) + delta)) in fp32, differentiable wrt A."""
    _check_inputs(anchor, safe, unsafe, beta, delta)
    a = anchor.float()
    d_safe = (a - safe.detach().float()).pow(2).mean(1)
    d_unsafe = (a - unsafe.detach().float()).pow(2).mean(1)
    return (beta * (d_safe - d_unsafe + delta)).clamp(min=0)


def contrastive_hinge(anchor, safe, unsafe, beta: float = 1.0, delta: float = 0.01, *, backend="auto") -> torch.Tensor:
    """TRCE stage 2's per-sample hinge (B,) fp32, differentiable wrt ``anchor`` (see the module
    docstring); ``safe`` and ``unsafe`` are targets (no gradient). Defaults: beta 1, delta 0.01.
    backend: "auto" (Triton where it can run, else torch), "triton" or "torch"."""
    _check_inputs(anchor, safe, unsafe, beta, delta)
    if use_triton(backend, anchor, safe, unsafe):
        return _ContrastiveHinge.apply(anchor, safe.detach(), unsafe.detach(), float(beta), float(delta))
    return contrastive_hinge_reference(anchor, safe, unsafe, beta, delta)
