"""Fused negative-guidance loss: the target from K frozen predictions, the loss and its gradient.

Math. For sample b with frozen predictions F[b, k, :] (k = 0..K-1, each N elements: a noise
prediction flattened), per-sample coefficients C[b, k], an optional per-element weight
M[b, :] (a mask; 1 where absent) and the trainee's prediction P[b, :]:

    target[b, n] = sum_k C[b, k] F[b, k, n]
    loss[b]      = (1 / N) sum_n M[b, n] (P[b, n] - target[b, n])^2
    dloss[b] / dP[b, n] = (2 / N) M[b, n] (P[b, n] - target[b, n])

Every method of the negative-guidance family is one choice of F and C (DESIGN 2.2). ESD:
F = [eps*(x,t,""), eps*(x,t,c)], C = [1 + eta, -eta] (target u - eta (e_c - u)); a positive
(preserve) branch of Bi-Erasing uses C = [1 - eta_p, eta_p]; a plain regulariser onto one frozen
prediction uses K = 1, C = [1]. The mean over N of an unmasked sample is ``F.mse_loss``.

Layout. ``pred`` (B, N), ``frozen`` (B, K, N), ``coeffs`` (B, K) and ``mask`` (B, N), each
contiguous in its last dimension (callers flatten C x H x W into N). fp32 / fp16 / bf16 inputs,
fp32 arithmetic. Outputs: ``loss`` (B,) fp32 and, when the trainee needs a gradient, ``grad``
(B, N) in pred's dtype, written in the same pass so the backward is a per-sample scale.

Kernel. Grid (B, cdiv(N, BLOCK)): each program reads one BLOCK of one sample from every input
once, writes that block of the gradient, and one partial sum of the loss into
``partial[b, block]``; the launcher sums the partials (deterministic, unlike atomics). One
read of K + 2 (B, N) arrays and one write: the eager torch version makes ~2K + 6 passes.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_importable, use_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if triton_importable():  # the module must import (and the torch reference work) without triton
    import triton
    import triton.language as tl

    @triton.jit
    def _guidance_loss_kernel(
        pred_ptr,  # *trainee prediction (B, N)
        frozen_ptr,  # *frozen predictions (B, K, N)
        coeff_ptr,  # *coefficients (B, K)
        mask_ptr,  # *per-element weights (B, N); unused unless HAS_MASK
        grad_ptr,  # *out: d loss[b] / d pred (B, N), pred's dtype; unused unless WRITE_GRAD
        partial_ptr,  # *out fp32 (B, n_blocks): partial sums of M (P - target)^2
        N,  # elements per sample
        K,  # frozen predictions per sample
        n_blocks,  # cdiv(N, BLOCK)
        stride_pb,  # pred stride between samples
        stride_fb,  # frozen stride between samples
        stride_fk,  # frozen stride between predictions of one sample
        stride_cb,  # coeffs stride between samples
        stride_ck,  # coeffs stride between predictions
        stride_mb,  # mask stride between samples
        stride_gb,  # grad stride between samples
        HAS_MASK: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,  # elements per program
    ):
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        p = tl.load(pred_ptr + b * stride_pb + offs, mask=valid, other=0.0).to(tl.float32)
        target = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(K):
            c = tl.load(coeff_ptr + b * stride_cb + k * stride_ck).to(tl.float32)
            f = tl.load(frozen_ptr + b * stride_fb + k * stride_fk + offs, mask=valid, other=0.0)
            target += c * f.to(tl.float32)
        diff = p - target
        weighted = diff
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + offs, mask=valid, other=0.0).to(tl.float32)
            weighted = m * diff
        # Out-of-range lanes loaded zeros everywhere, so they add nothing to the sum.
        tl.store(partial_ptr + b * n_blocks + blk, tl.sum(weighted * diff, axis=0))
        if WRITE_GRAD:
            g = weighted * (2.0 / N)
            tl.store(grad_ptr + b * stride_gb + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _check_inputs(pred, frozen, coeffs, mask) -> None:
    """Raise a ValueError naming the first problem with guidance_loss's inputs."""
    named = [("pred", pred), ("frozen", frozen), ("coeffs", coeffs)] + ([("mask", mask)] if mask is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"guidance_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"guidance_loss: {name} must be fp32/fp16/bf16, got {t.dtype}")
        if t.device != pred.device:
            raise ValueError(f"guidance_loss: {name} is on {t.device}, pred on {pred.device}")
    if pred.dim() != 2:
        raise ValueError(f"guidance_loss: pred must be (B, N), got shape {tuple(pred.shape)}")
    b, n = pred.shape
    if frozen.dim() != 3 or frozen.shape[0] != b or frozen.shape[2] != n:
        raise ValueError(f"guidance_loss: frozen must be ({b}, K, {n}) to match pred, got {tuple(frozen.shape)}")
    k = frozen.shape[1]
    if k == 0:
        raise ValueError("guidance_loss: frozen holds no predictions (K = 0)")
    if tuple(coeffs.shape) != (b, k):
        raise ValueError(f"guidance_loss: coeffs must be ({b}, {k}), got {tuple(coeffs.shape)}")
    if mask is not None and tuple(mask.shape) != (b, n):
        raise ValueError(f"guidance_loss: mask must be ({b}, {n}) like pred, got {tuple(mask.shape)}")


def _launch(pred, frozen, coeffs, mask, write_grad: bool):
    """Run the kernel; returns (loss (B,) fp32, grad (B, N) in pred's dtype or None)."""
    b, n = pred.shape
    k = frozen.shape[1]
    pred, frozen = pred.contiguous(), frozen.contiguous()
    mask = mask.contiguous() if mask is not None else None
    if b == 0 or n == 0:
        return torch.zeros(b, device=pred.device), torch.zeros_like(pred) if write_grad else None
    block = min(4096, max(128, triton.next_power_of_2(n)))
    n_blocks = triton.cdiv(n, block)
    partial = torch.empty((b, n_blocks), dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if write_grad else None
    _guidance_loss_kernel[(b, n_blocks)](
        pred, frozen, coeffs, mask if mask is not None else pred, grad if write_grad else pred, partial,
        n, k, n_blocks,
        pred.stride(0), frozen.stride(0), frozen.stride(1), coeffs.stride(0), coeffs.stride(1),
        mask.stride(0) if mask is not None else 0, grad.stride(0) if write_grad else 0,
        HAS_MASK=mask is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=4,
    )
    return partial.sum(1) / n, grad


class _GuidanceLoss(torch.autograd.Function):
    """Triton forward writes the gradient too; backward scales it by each sample's d_loss."""

    @staticmethod
    def forward(ctx, pred, frozen, coeffs, mask):
        loss, grad = _launch(pred, frozen, coeffs, mask, write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        (grad,) = ctx.saved_tensors
        d_pred = None
        if ctx.needs_input_grad[0]:
            d_pred = (grad.float() * d_loss[:, None].float()).to(grad.dtype)
        # The frozen predictions, coefficients and mask are constants of the objective.
        return d_pred, None, None, None


def guidance_target(frozen, coeffs) -> torch.Tensor:
    """sum_k coeffs[b, k] frozen[b, k, :] in fp32: the regression target of the loss."""
    return torch.einsum("bk,bkn->bn", coeffs.float(), frozen.float())


def guidance_loss_reference(pred, frozen, coeffs, mask=None) -> torch.Tensor:
    """Pure torch: per-sample (1/N) sum M (pred - target)^2 in fp32, differentiable wrt pred."""
    _check_inputs(pred, frozen, coeffs, mask)
    sq = (pred.float() - guidance_target(frozen.detach(), coeffs.detach())).pow(2)
    if mask is not None:
        sq = sq * mask.detach().float()
    return sq.mean(1)


def guidance_loss(pred, frozen, coeffs, mask=None, *, backend="auto") -> torch.Tensor:
    """Per-sample negative-guidance loss (B,) fp32, differentiable wrt ``pred`` (see the module
    docstring). ``pred`` (B, N), ``frozen`` (B, K, N), ``coeffs`` (B, K), ``mask`` (B, N) or None.
    backend: "auto" (Triton where it can run, else torch), "triton" or "torch"."""
    _check_inputs(pred, frozen, coeffs, mask)
    if use_triton(backend, pred, frozen, coeffs, *([mask] if mask is not None else [])):
        return _GuidanceLoss.apply(pred, frozen.detach(), coeffs.detach(),
                                   mask.detach() if mask is not None else None)
    return guidance_loss_reference(pred, frozen, coeffs, mask)
