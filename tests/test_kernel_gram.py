"""engine.kernels.gram.weighted_gram: the Triton path (the interpreter on CPU) against the torch reference.
Input checks and backend dispatch, common to every op, are tests/test_kernel_contract.py's."""

import pytest
import torch

from engine.kernels import weighted_gram, weighted_gram_reference
from kernel_contract import DEVICE, assert_close, gram_inputs, needs_cuda, needs_triton

# (D, N, Ns, Nt, dtype, atol, rtol). atol is relative to the largest |reference| entry, so one
# tolerance fits outputs (entries ~ N) and gradients alike. fp16 forward is as exact as fp32 (fp32
# accumulation of exact products); its gradients are rounded to fp16, hence the looser pair.
CASES = [
    (37, 53, 90, 70, torch.float32, 1e-6, 1e-5),
    (64, 100, 100, 60, torch.float32, 1e-6, 1e-5),
    (70, 1, 5, 3, torch.float32, 1e-6, 1e-5),
    (16, 17, 20, 20, torch.float32, 1e-6, 1e-5),
    (37, 53, 90, 70, torch.float16, 2e-3, 4e-3),
    (70, 100, 100, 60, torch.float16, 2e-3, 4e-3),
]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def outputs_and_grads(fn, src, tgt, weight, src_index, tgt_index, seed=1):
    """(S, C) and the gradients of a random linear loss wrt src, tgt, weight."""
    s, t, w = leaves(src, tgt, weight)
    S, C = fn(s, t, w, src_index, tgt_index)
    g = torch.Generator().manual_seed(seed)
    gS = torch.randn(S.shape, generator=g).to(S.device)
    gC = torch.randn(C.shape, generator=g).to(C.device)
    ((S * gS).sum() + (C * gC).sum()).backward()
    return S.detach(), C.detach(), s.grad, t.grad, w.grad


@needs_triton
@pytest.mark.parametrize("D, N, Ns, Nt, dtype, atol, rtol", CASES)
def test_forward_and_gradients_match_reference(D, N, Ns, Nt, dtype, atol, rtol):
    inputs = gram_inputs(D, N, Ns, Nt, dtype)
    got = outputs_and_grads(lambda *a: weighted_gram(*a, backend="triton"), *inputs)
    want = outputs_and_grads(weighted_gram_reference, *inputs)
    S, C = got[:2]
    assert S.dtype == C.dtype == torch.float32 and S.shape == C.shape == (D, D)
    assert S.abs().max() > 1  # a real sum of random rows, not an accidental zero
    for name, a, e in zip(("S", "C", "d_src", "d_tgt", "d_weight"), got, want):
        assert a is not None, name
        assert_close(a, e, atol, rtol)
    # The gradient dtypes follow the inputs.
    assert got[2].dtype == got[3].dtype == got[4].dtype == dtype


@needs_triton
def test_matches_explicit_sum_with_repeats():
    """Independent of the reference: S and C are the plain sums over the selected rows."""
    src, tgt, weight, si, ti = gram_inputs(21, 30, 12, 9, torch.float32, seed=3)
    si[:5] = 7  # one row selected five times
    S, C = weighted_gram(src, tgt, weight, si, ti, backend="triton")
    S_want = sum(weight[i] * torch.outer(src[si[i]], src[si[i]]) for i in range(30))
    C_want = sum(weight[i] * torch.outer(tgt[ti[i]], src[si[i]]) for i in range(30))
    torch.testing.assert_close(S, S_want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(C, C_want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(S, S.T)  # a Gram matrix is symmetric


@needs_triton
def test_strided_tables():
    """The kernel addresses the tables by strides: column-major and sliced tables work too."""
    src, tgt, weight, si, ti = gram_inputs(37, 53, 90, 70, torch.float32, seed=4)
    src_t = src.T.contiguous().T  # same values, column-major
    tgt_wide = torch.cat([tgt, torch.randn_like(tgt)], 1)[:, :37]  # row stride 74
    assert not src_t.is_contiguous() and not tgt_wide.is_contiguous()
    S, C = weighted_gram(src_t, tgt_wide, weight, si, ti, backend="triton")
    S_want, C_want = weighted_gram_reference(src, tgt, weight, si, ti)
    assert_close(S, S_want, 1e-6, 1e-5)
    assert_close(C, C_want, 1e-6, 1e-5)


@needs_triton
def test_mixed_input_dtypes():
    src, tgt, weight, si, ti = gram_inputs(40, 50, 60, 60, torch.float16, seed=5)
    tgt, weight = tgt.float(), weight.double()
    S, C = weighted_gram(src, tgt, weight, si, ti, backend="triton")
    S_want, C_want = weighted_gram_reference(src, tgt, weight, si, ti)
    assert_close(S, S_want, 1e-6, 1e-5)
    assert_close(C, C_want, 1e-6, 1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5), (torch.float16, 2e-3, 4e-3)])
def test_same_tensor_for_src_and_tgt(dtype, atol, rtol):
    """One table on both sides (the engine's layout): its gradient gets both contributions."""
    table, _, weight, si, ti = gram_inputs(37, 53, 80, 80, dtype, seed=6)
    ti = torch.randint(0, 80, (53,), generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def one_table(fn):
        t, w = leaves(table, weight)
        S, C = fn(t, t, w, si, ti)
        g = torch.Generator().manual_seed(8)
        gS, gC = torch.randn(S.shape, generator=g).to(DEVICE), torch.randn(C.shape, generator=g).to(DEVICE)
        ((S * gS).sum() + (C * gC).sum()).backward()
        return S.detach(), C.detach(), t.grad, w.grad

    got = one_table(lambda *a: weighted_gram(*a, backend="triton"))
    want = one_table(weighted_gram_reference)
    for a, e in zip(got, want):
        assert_close(a, e, atol, rtol)
    # Same answer as two separate copies, whose gradients add up to the shared one.
    S2, C2, d_src, d_tgt, _ = outputs_and_grads(
        lambda *a: weighted_gram(*a, backend="triton"), table, table.clone(), weight, si, ti, seed=8
    )
    torch.testing.assert_close(got[0], S2, atol=0, rtol=0)
    torch.testing.assert_close(got[1], C2, atol=0, rtol=0)
    assert_close(got[2], (d_src.float() + d_tgt.float()).to(dtype), atol, rtol)
    assert d_tgt.abs().max() > 0 and d_src.abs().max() > 0  # both sides really contribute


@needs_triton
def test_gradient_of_one_output_only():
    """A loss on C alone: S's gradient arrives as zeros and the weight gradient is C's part only."""
    src, tgt, weight, si, ti = gram_inputs(20, 25, 30, 30, torch.float32, seed=9)
    grads = []
    for fn in (lambda *a: weighted_gram(*a, backend="triton"), weighted_gram_reference):
        s, t, w = leaves(src, tgt, weight)
        fn(s, t, w, si, ti)[1].sum().backward()
        grads.append((s.grad, t.grad, w.grad))
    for a, e in zip(*grads):
        assert_close(a, e, 1e-6, 1e-5)


@needs_cuda
@pytest.mark.parametrize("D, N, Ns, Nt, atol", [(37, 53, 90, 70, 1e-3), (70, 100, 100, 60, 1e-3)])
def test_bf16_within_twice_torch_error(D, N, Ns, Nt, atol):
    """bf16 inputs: the kernel's error vs an fp64 truth is at most twice torch's own bf16 error."""
    inputs = gram_inputs(D, N, Ns, Nt, torch.bfloat16, seed=10)

    def native(src, tgt, weight, si, ti):  # torch computing in the inputs' dtype, no upcast
        Sg, Tg = src[si], tgt[ti]
        return (Sg * weight[:, None]).T @ Sg, (Tg * weight[:, None]).T @ Sg

    src, tgt, weight, si, ti = inputs
    got = outputs_and_grads(lambda *a: weighted_gram(*a, backend="triton"), *inputs)
    torch_bf16 = outputs_and_grads(native, *inputs)
    truth = outputs_and_grads(native, src.double(), tgt.double(), weight.double(), si, ti)  # fp64 leaves
    for name, a, b, e in zip(("S", "C", "d_src", "d_tgt", "d_weight"), got, torch_bf16, truth):
        scale = e.abs().max().item()
        err = (a.double() - e.double()).abs().max().item() / scale
        err_torch = (b.double() - e.double()).abs().max().item() / scale
        assert err <= 2 * err_torch + atol, (name, err, err_torch)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_selection_gives_zeros(backend):
    src, tgt, weight, si, ti = gram_inputs(37, 0, 10, 10, torch.float32)
    s, t, w = leaves(src, tgt, weight)
    S, C = weighted_gram(s, t, w, si, ti, backend=backend)
    assert S.shape == C.shape == (37, 37) and S.dtype == C.dtype == torch.float32
    assert not S.any() and not C.any()
    (S.sum() + C.sum()).backward()
    assert s.grad is not None and not s.grad.any() and not t.grad.any()


@needs_triton
def test_empty_selection_from_empty_tables():
    empty = torch.zeros(0, 8, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    S, C = weighted_gram(empty, empty, torch.zeros(0, device=DEVICE), none, none, backend="triton")
    assert S.shape == (8, 8) and not S.any() and not C.any()


# fp64 accumulation: (D, N, Ns, Nt, table dtype, atol, rtol); exact fp64 products and sums.
FP64_CASES = [
    (37, 53, 90, 70, torch.float32, 1e-12, 1e-11),
    (70, 1, 5, 3, torch.float32, 1e-12, 1e-11),
    (33, 40, 50, 50, torch.float16, 1e-12, 1e-11),
]


@needs_triton
@pytest.mark.parametrize("D, N, Ns, Nt, dtype, atol, rtol", FP64_CASES)
def test_fp64_accumulation_forward_and_gradients(D, N, Ns, Nt, dtype, atol, rtol):
    inputs = gram_inputs(D, N, Ns, Nt, dtype, seed=6)
    got = outputs_and_grads(lambda *a: weighted_gram(*a, out_dtype=torch.float64, backend="triton"), *inputs)
    want = outputs_and_grads(lambda *a: weighted_gram_reference(*a, out_dtype=torch.float64), *inputs)
    assert got[0].dtype == got[1].dtype == torch.float64
    for name, a, e in zip(("S", "C"), got[:2], want[:2]):
        assert_close(a, e, atol, rtol)
    for name, a, e in zip(("d_src", "d_tgt", "d_weight"), got[2:], want[2:]):
        assert a.dtype == dtype, name
        assert_close(a, e, 1e-6 if dtype == torch.float32 else 2e-3, 1e-5 if dtype == torch.float32 else 4e-3)


@needs_triton
def test_fp64_accumulation_is_exact_where_fp32_rounds():
    """Rows with a large common component: fp32 sums lose the small parts, fp64 keeps them."""
    g = torch.Generator().manual_seed(8)
    D, N = 24, 64
    src = (1e3 + torch.randn(N, D, generator=g)).float()
    idx = torch.arange(N)
    w = torch.rand(N, generator=g).float() + 0.5
    exact = (src.double() * w.double()[:, None]).T @ src.double()
    S64, _ = weighted_gram(src, src, w, idx, idx, out_dtype=torch.float64, backend="triton")
    S32, _ = weighted_gram(src, src, w, idx, idx, backend="triton")
    err64 = float((S64 - exact).abs().max() / exact.abs().max())
    err32 = float((S32.double() - exact).abs().max() / exact.abs().max())
    assert err64 < 1e-13 < 1e-9 < err32


def test_out_dtype_is_checked():
    src, tgt, weight, si, ti = gram_inputs(8, 5, 6, 6, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        weighted_gram(src, tgt, weight, si, ti, out_dtype=torch.float16)
