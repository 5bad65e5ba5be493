"""Every op of engine.kernels keeps the same contract: its inputs are checked before dispatch, so
all backends raise the same ValueErrors; an unknown backend is refused; backend="torch" never
launches the kernel and "auto" does where Triton runs; backend="triton" errors where Triton
cannot run, and "auto" falls back to the reference there (tests/kernel_contract.py has the ops)."""

import pytest
import torch

import engine.kernels._dispatch as dispatch
from kernel_contract import OPS, needs_triton

INVALID = [(op, case, make, message) for op in OPS for case, make, message in op.invalid]
VALID = [(op, i) for op in OPS for i in range(len(op.valid))]


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("op, case, make, message", INVALID, ids=[f"{op}-{case}" for op, case, _, _ in INVALID])
def test_invalid_inputs_raise_value_error(op, case, make, message, backend):
    args, kwargs = make()
    with pytest.raises(ValueError, match=message):
        op.fn(*args, **kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["cuda", "gpu"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_unknown_backend(op, backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        op.fn(*op.valid[0](), backend=backend)


def _kernel_must_not_run(*args, **kwargs):
    raise AssertionError("the Triton launcher ran")


@needs_triton
@pytest.mark.parametrize("op, inputs", VALID, ids=[f"{op}-{i}" for op, i in VALID])
def test_backend_torch_never_launches_the_kernel(op, inputs, monkeypatch):
    args = op.valid[inputs]()
    monkeypatch.setattr(op.module, op.launcher, _kernel_must_not_run)
    torch.testing.assert_close(op.fn(*args, backend="torch"), op.reference(*args), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="launcher ran"):  # and "auto" does pick the kernel here
        op.fn(*args, backend="auto")


@pytest.mark.parametrize("op, inputs", VALID, ids=[f"{op}-{i}" for op, i in VALID])
def test_backend_triton_errors_when_triton_cannot_run(op, inputs, monkeypatch):
    args = op.valid[inputs]()
    monkeypatch.setattr(dispatch, "triton_can_run", lambda *tensors: False)
    monkeypatch.setattr(op.module, op.launcher, _kernel_must_not_run)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        op.fn(*args, backend="triton")
    # "auto" falls back to the reference
    torch.testing.assert_close(op.fn(*args, backend="auto"), op.reference(*args), atol=0, rtol=0)
