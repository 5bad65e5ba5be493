"""engine.kernels.kv_update.stacked_transform: the Triton path (interpreter on CPU) against the torch reference.
Input checks and backend dispatch, common to every op, are tests/test_kernel_contract.py's."""

import pytest
import torch

import engine.kernels.kv_update as kv_update
from engine.kernels import stacked_transform, stacked_transform_reference
from kernel_contract import DEVICE, assert_close, kv_inputs, needs_cuda, needs_triton

# (R, D, weight dtype, transform dtype, atol, rtol). atol is relative to the largest |reference|
# entry. fp16 outputs and weight gradients are rounded to fp16 (half an ulp is ~5e-4 relative).
CASES = [
    (75, 37, torch.float32, torch.float32, 1e-6, 1e-5),
    (75, 37, torch.float32, torch.float64, 1e-6, 1e-5),
    (1, 16, torch.float32, torch.float32, 1e-6, 1e-5),
    (100, 70, torch.float32, torch.float64, 1e-6, 1e-5),
    (64, 64, torch.float32, torch.float32, 1e-6, 1e-5),
    (75, 37, torch.float16, torch.float32, 1e-3, 2e-3),
    (100, 70, torch.float16, torch.float64, 1e-3, 2e-3),
]


def output_and_grads(fn, weights, transform, seed=1):
    """weights @ transform and the gradients of a random linear loss wrt both inputs."""
    w = weights.detach().clone().requires_grad_(True)
    t = transform.detach().clone().requires_grad_(True)
    out = fn(w, t)
    g = torch.Generator().manual_seed(seed)
    (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
    return out.detach(), w.grad, t.grad


@needs_triton
@pytest.mark.parametrize("R, D, w_dtype, t_dtype, atol, rtol", CASES)
def test_forward_and_gradients_match_reference(R, D, w_dtype, t_dtype, atol, rtol):
    weights, transform = kv_inputs(R, D, w_dtype, t_dtype)
    got = output_and_grads(lambda w, t: stacked_transform(w, t, backend="triton"), weights, transform)
    want = output_and_grads(stacked_transform_reference, weights, transform)
    out, d_w, d_t = got
    assert out.shape == (R, D) and out.dtype == w_dtype
    assert d_w.dtype == w_dtype and d_t.dtype == t_dtype  # gradients in their inputs' dtypes
    for name, a, e in zip(("out", "d_weights", "d_transform"), got, want):
        assert_close(a, e, atol, rtol)


@needs_triton
def test_matches_fp64_product():
    """Independent of the reference: fp32 accumulation is within fp32 rounding of the fp64 product."""
    weights, transform = kv_inputs(75, 37, torch.float32, torch.float64, seed=2)
    out = stacked_transform(weights, transform, backend="triton")
    exact = weights.double() @ transform
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (out.double() - exact).abs().max() > 0  # the fp64 transform really was rounded to fp32


@needs_triton
def test_strided_inputs():
    """The kernel addresses both inputs by strides: transposed and sliced views work too."""
    weights, transform = kv_inputs(75, 37, torch.float32, torch.float32, seed=3)
    w_view = torch.cat([weights, torch.randn_like(weights)], 1)[:, :37]  # row stride 74
    t_view = transform.T.contiguous().T  # column-major
    assert not w_view.is_contiguous() and not t_view.is_contiguous()
    out = stacked_transform(w_view, t_view, backend="triton")
    assert out.is_contiguous()
    assert_close(out, stacked_transform_reference(weights, transform), 1e-6, 1e-5)


@needs_cuda
@pytest.mark.parametrize("R, D, atol", [(75, 37, 1e-3), (100, 70, 1e-3)])
def test_bf16_within_twice_torch_error(R, D, atol):
    """bf16 weights: the kernel's error vs an fp64 truth is at most twice torch's own bf16 error."""
    weights, transform = kv_inputs(R, D, torch.bfloat16, torch.float32, seed=4)
    got = output_and_grads(lambda w, t: stacked_transform(w, t, backend="triton"), weights, transform)
    torch_bf16 = output_and_grads(lambda w, t: w @ t.to(torch.bfloat16), weights, transform)
    truth = output_and_grads(lambda w, t: w @ t, weights.double(), transform.double())
    assert got[0].dtype == torch.bfloat16
    for name, a, b, e in zip(("out", "d_weights", "d_transform"), got, torch_bf16, truth):
        scale = e.abs().max().item()
        err = (a.double() - e).abs().max().item() / scale
        err_torch = (b.double() - e).abs().max().item() / scale
        assert err <= 2 * err_torch + atol, (name, err, err_torch)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_stack(backend):
    weights, transform = kv_inputs(0, 37, torch.float16, torch.float32)
    out = stacked_transform(weights, transform, backend=backend)
    assert out.shape == (0, 37) and out.dtype == torch.float16


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transform_each_matches_per_matrix_products(backend, dtype):
    """Every matrix of a list of K/V-like shapes gets W @ T, in one launch or one product each."""
    g = torch.Generator().manual_seed(9)
    D = 37
    weights = [torch.randn(rows, D, generator=g).to(DEVICE, dtype) for rows in (5, 23, 16, 1)]
    transform = (torch.eye(D) + torch.randn(D, D, generator=g) / D**0.5).to(DEVICE)
    out = kv_update.transform_each(weights, transform, backend=backend)
    assert [o.shape for o in out] == [w.shape for w in weights]
    for w, o in zip(weights, out):
        assert o.dtype == dtype
        torch.testing.assert_close(o, stacked_transform_reference(w, transform), atol=2e-3, rtol=2e-3)


@needs_triton
def test_transform_each_launches_once_on_triton(monkeypatch):
    calls = []
    real = kv_update._launch_stacked_transform
    monkeypatch.setattr(kv_update, "_launch_stacked_transform", lambda *a, **k: calls.append(1) or real(*a, **k))
    weights = [torch.randn(r, 20, device=DEVICE) for r in (3, 7, 11)]
    kv_update.transform_each(weights, torch.eye(20, device=DEVICE), backend="triton")
    assert calls == [1]
    assert kv_update.transform_each([], torch.eye(20, device=DEVICE)) == []
