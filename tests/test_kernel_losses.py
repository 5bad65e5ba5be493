"""engine.kernels.guidance_loss and kernels.contrastive_hinge: Triton (interpreter on CPU) against the
torch references and against direct formulas, forward and gradients, on fresh random inputs.
Input checks and backend dispatch, common to every op, are tests/test_kernel_contract.py's."""

import pytest
import torch

from engine.kernels.contrastive_hinge import contrastive_hinge, contrastive_hinge_reference
from engine.kernels.guidance_loss import guidance_loss, guidance_loss_reference
from kernel_contract import DEVICE, hinge_inputs, loss_inputs, needs_cuda, needs_triton, rand

# (B, N, K, dtype, tol): odd N (not a multiple of the block), one sample, several blocks per sample.
# fp16 inputs are rounded once on the way in; the loss is fp32; the fp16 gradient is half an ulp off.
LOSS_CASES = [
    (3, 37, 2, torch.float32, 1e-5),
    (1, 256, 1, torch.float32, 1e-5),
    (4, 5000, 3, torch.float32, 1e-5),
    (2, 999, 2, torch.float16, 2e-3),
]


def _value_and_grad(fn, pred, *args, seed=9):
    p = pred.detach().clone().requires_grad_(True)
    loss = fn(p, *args)
    weights = rand(loss.shape, seed)  # a random linear combination of the per-sample losses
    (loss * weights).sum().backward()
    return loss.detach(), p.grad


@needs_triton
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("B, N, K, dtype, tol", LOSS_CASES)
def test_guidance_loss_matches_reference(B, N, K, dtype, tol, with_mask):
    pred, frozen, coeffs, mask = loss_inputs(B, N, K, dtype, seed=B * N + K, with_mask=with_mask)
    got = _value_and_grad(lambda p, *a: guidance_loss(p, *a, backend="triton"), pred, frozen, coeffs, mask)
    want = _value_and_grad(guidance_loss_reference, pred, frozen, coeffs, mask)
    assert got[0].dtype == torch.float32 and got[0].shape == (B,)
    assert got[1].dtype == dtype and got[1].shape == (B, N)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), atol=tol * e.abs().max().item(), rtol=tol)


@needs_triton
def test_guidance_loss_is_the_esd_equation():
    """Independent of the reference: ESD's ||eps_theta - (u - eta (e_c - u))||^2 with F.mse_loss."""
    B, N, eta = 3, 4 * 8 * 8, 1.0
    pred, uncond, cond = rand((B, N), 20), rand((B, N), 21), rand((B, N), 22)
    coeffs = torch.tensor([[1 + eta, -eta]] * B, device=DEVICE)
    got = _value_and_grad(lambda p: guidance_loss(p, torch.stack([uncond, cond], 1), coeffs, backend="triton"), pred)
    p = pred.clone().requires_grad_(True)
    target = uncond - eta * (cond - uncond)
    per_sample = torch.stack([torch.nn.functional.mse_loss(p[b], target[b]) for b in range(B)])
    (per_sample * rand((B,), 9)).sum().backward()
    torch.testing.assert_close(got[0], per_sample.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], p.grad, atol=1e-6, rtol=1e-5)


@needs_cuda
def test_guidance_loss_bf16_within_twice_torch_error():
    pred, frozen, coeffs, mask = loss_inputs(4, 3000, 2, torch.bfloat16, seed=5, with_mask=True)
    got = _value_and_grad(lambda p, *a: guidance_loss(p, *a, backend="triton"), pred, frozen, coeffs, mask)
    ref = _value_and_grad(guidance_loss_reference, pred, frozen, coeffs, mask)
    truth = _value_and_grad(guidance_loss_reference, pred.double().float(), frozen.float(), coeffs.float(), mask.float())
    for a, r, t in zip(got, ref, truth):
        scale = t.abs().max().item()
        assert (a.float() - t).abs().max().item() <= 2 * (r.float() - t).abs().max().item() + 1e-3 * scale


# (B, N, dtype, tol)
HINGE_CASES = [(4, 37, torch.float32, 1e-5), (6, 5000, torch.float32, 1e-5), (3, 999, torch.float16, 2e-3)]


@needs_triton
@pytest.mark.parametrize("B, N, dtype, tol", HINGE_CASES)
def test_contrastive_hinge_matches_reference(B, N, dtype, tol):
    anchor, safe, unsafe = hinge_inputs(B, N, dtype, seed=B + N)
    got = _value_and_grad(lambda a, s, u: contrastive_hinge(a, s, u, 2.0, 0.01, backend="triton"), anchor, safe, unsafe)
    want = _value_and_grad(lambda a, s, u: contrastive_hinge_reference(a, s, u, 2.0, 0.01), anchor, safe, unsafe)
    assert 0 < (want[0] > 0).sum() < B  # both sides of the hinge are exercised
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e.float(), atol=tol * e.abs().max().item(), rtol=tol)
    inactive = want[0] == 0
    assert (got[1][inactive] == 0).all()


@needs_triton
def test_contrastive_hinge_is_the_trce_equation():
    """Independent of the reference: max(0, beta (MSE(a, f_safe) - MSE(a, f_unsafe) + delta))."""
    anchor, safe, unsafe = hinge_inputs(5, 300, torch.float32, seed=3)
    got = contrastive_hinge(anchor, safe, unsafe, beta=0.5, delta=0.01, backend="triton")
    mse = torch.nn.functional.mse_loss
    want = torch.stack([torch.relu(0.5 * (mse(anchor[b], safe[b]) - mse(anchor[b], unsafe[b]) + 0.01))
                        for b in range(5)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
