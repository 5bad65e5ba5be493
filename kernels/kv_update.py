"""The stacked `W_l <- W_l T` update of every cross-attention K/V projection.

Math. Every key/value projection W_l (out_l, D) of the UNet's cross-attention reads the text
embedding, so the closed-form edit replaces each by W_l T with one (D, D) transform T. Stacking
all of them along rows, W = [W_1; W_2; ...] (R, D), R = sum_l out_l, the update is one product

    O = W T        O[r, c] = sum_k W[r, k] T[k, c]        (R, D)

Layout. `weights` (R, D) and `transform` (D, D) are addressed through their strides (any
layout). `weights` may be fp32 / fp16 / bf16; `transform` is fp32 (fp64, as the solve produces
it, is rounded to fp32 first). Tiles are upcast to fp32 and accumulated in fp32; the output
is written in weights.dtype, contiguous (R, D).

Kernel. A standard tiled matmul: one program owns an output tile O[rows, cols]
(BLOCK_R x BLOCK_C) and loops over the shared dimension K = D, BLOCK_K at a time. Masks
handle R and D that are not multiples of the blocks.

Backward (plain torch, fp32 products): dW = dO T^T in weights.dtype, dT = W^T dO in fp32.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_importable, use_triton

_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRANSFORM_DTYPES = (torch.float32, torch.float64)

if triton_importable():  # the module must import (and the torch reference work) without triton
    import triton
    import triton.language as tl

    @triton.jit
    def _stacked_transform_kernel(
        w_ptr,  # *weights (R, D), fp32 / fp16 / bf16
        t_ptr,  # *fp32 transform (D, D)
        out_ptr,  # *output (R, D), contiguous, same dtype as weights
        R,  # rows of the stacked weights
        D,  # embedding width (columns of weights, both sides of transform)
        stride_wr,  # weights stride between rows (elements)
        stride_wk,  # weights stride between columns (elements)
        stride_tk,  # transform stride between rows (elements)
        stride_tc,  # transform stride between columns (elements)
        BLOCK_R: tl.constexpr,  # output rows per program (>= 16 for tl.dot)
        BLOCK_C: tl.constexpr,  # output columns per program (>= 16 for tl.dot)
        BLOCK_K: tl.constexpr,  # shared-dimension step (>= 16 for tl.dot)
        EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: the K loop needs no masks
    ):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        # int64 row offsets: R * D can exceed 2^31 for a big stack.
        offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_K)
        mask_r = offs_r < R
        mask_c = offs_c < D

        w_tile = w_ptr + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk
        t_tile = t_ptr + offs_k[:, None] * stride_tk + offs_c[None, :] * stride_tc
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            if EVEN_K:
                m_w = mask_r[:, None]
                m_t = mask_c[None, :]
            else:
                m_w = mask_r[:, None] & (k0 + offs_k[None, :] < D)
                m_t = (k0 + offs_k[:, None] < D) & mask_c[None, :]
            a = tl.load(w_tile, mask=m_w, other=0.0).to(tl.float32)
            b = tl.load(t_tile, mask=m_t, other=0.0).to(tl.float32)
            # fp32 tiles: bf16 dots are wrong in the interpreter, and "ieee" keeps the product
            # exact to fp32 on GPUs (TF32 would round T to 10 mantissa bits).
            acc = tl.dot(a, b, acc, input_precision="ieee")
            w_tile += BLOCK_K * stride_wk
            t_tile += BLOCK_K * stride_tk

        out = out_ptr + offs_r[:, None] * D + offs_c[None, :]
        # GPUs round fp32 -> fp16/bf16 to nearest even; the interpreter truncates fp32 -> bf16.
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


def _check_inputs(weights, transform) -> None:
    """Raise a ValueError naming the first problem with the inputs of stacked_transform."""
    for name, t in (("weights", weights), ("transform", transform)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"stacked_transform: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weights.device != transform.device:
        raise ValueError(
            f"stacked_transform: weights and transform must be on one device, "
            f"got {weights.device} and {transform.device}"
        )
    if weights.dim() != 2:
        raise ValueError(f"stacked_transform: weights must be 2-D (R, D), got shape {tuple(weights.shape)}")
    if weights.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"stacked_transform: weights must be fp32/fp16/bf16, got {weights.dtype}")
    d = weights.shape[1]
    if transform.shape != (d, d):
        raise ValueError(
            f"stacked_transform: transform must be ({d}, {d}) to match weights of shape "
            f"{tuple(weights.shape)}, got {tuple(transform.shape)}"
        )
    if transform.dtype not in _TRANSFORM_DTYPES:
        raise ValueError(f"stacked_transform: transform must be fp32 or fp64, got {transform.dtype}")


def _block_sizes(r: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_K): fixed by the launcher (no autotune: it needs a GPU to benchmark)."""
    # tl.dot needs every tile side >= 16. A 64 x 64 fp32 accumulator is 32 registers a thread over
    # 4 warps; not tuned on hardware.
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    block_c = min(64, max(16, triton.next_power_of_2(d)))
    block_k = min(32, max(16, triton.next_power_of_2(d)))
    return block_r, block_c, block_k


def _launch_stacked_transform(weights, transform, check=True) -> torch.Tensor:
    """Run the Triton kernel on fp32 `transform`; returns weights @ transform, (R, D) in weights.dtype.

    check=False skips the input checks, for callers that just ran them.
    """
    if check:
        _check_inputs(weights, transform)
    if transform.dtype != torch.float32:
        raise ValueError(f"stacked_transform: the kernel takes an fp32 transform, got {transform.dtype}")
    r, d = weights.shape
    out = torch.empty((r, d), dtype=weights.dtype, device=weights.device)
    if r == 0 or d == 0:
        return out.zero_()  # (R, 0) or (0, D): nothing to launch, and an empty sum is zero
    block_r, block_c, block_k = _block_sizes(r, d)
    grid = (triton.cdiv(r, block_r), triton.cdiv(d, block_c))
    _stacked_transform_kernel[grid](
        weights,
        transform,
        out,
        r,
        d,
        weights.stride(0),
        weights.stride(1),
        transform.stride(0),
        transform.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        EVEN_K=d % block_k == 0,
        num_warps=4,
    )
    return out


class _StackedTransform(torch.autograd.Function):
    """Triton forward, torch backward: dW = dO T^T (weights.dtype), dT = W^T dO (fp32)."""

    @staticmethod
    def forward(ctx, weights, transform):
        # Only reached through stacked_transform, which has checked the inputs and made T fp32.
        ctx.save_for_backward(weights, transform)
        return _launch_stacked_transform(weights, transform, False)

    @staticmethod
    def backward(ctx, d_out):
        weights, transform = ctx.saved_tensors
        d_out = d_out.float()
        d_w = d_t = None
        if ctx.needs_input_grad[0]:
            d_w = (d_out @ transform.T).to(weights.dtype)
        if ctx.needs_input_grad[1]:
            d_t = weights.float().T @ d_out  # transform is fp32 here; autograd casts back to fp64
        return d_w, d_t


def stacked_transform_reference(weights, transform) -> torch.Tensor:
    """Pure-torch weights @ transform: fp32 product, result in weights.dtype. Differentiable."""
    return (weights.float() @ transform.float()).to(weights.dtype)


def stacked_transform(weights, transform, *, backend="auto") -> torch.Tensor:
    """weights @ transform for the stacked K/V matrices: (R, D) @ (D, D) -> (R, D) in weights.dtype.

    weights: fp32 / fp16 / bf16; transform: fp32 or fp64 (rounded to fp32). fp32 accumulation.
    Differentiable wrt both. backend: "auto" (Triton where it can run, else torch), "triton" or "torch".
    """
    _check_inputs(weights, transform)  # before dispatch, so both backends raise the same ValueErrors
    if use_triton(backend, weights, transform):
        # The fp64 -> fp32 cast stays outside the Function, so autograd returns dT in fp64.
        return _StackedTransform.apply(weights, transform.to(torch.float32))
    return stacked_transform_reference(weights, transform)


def transform_each(weights: list[torch.Tensor], transform, *, backend="auto") -> list[torch.Tensor]:
    """[W_l @ T for every W_l]: ONE stacked kernel launch where Triton runs, per matrix otherwise.

    Stacking pays on a GPU (one launch instead of dozens of small ones); on the CPU it would only
    add a copy of every matrix, and CPU BLAS runs a huge-M product slower than the pieces.
    """
    if not weights:
        return []
    if use_triton(backend, *weights, transform):
        stacked = stacked_transform(torch.cat(weights), transform, backend="triton")
        return list(stacked.split([w.shape[0] for w in weights]))
    return [stacked_transform(w, transform, backend="torch") for w in weights]
