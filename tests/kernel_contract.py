"""What every op of engine.kernels promises, whichever backend runs it, and the test vocabulary
the kernel tests share: the device and skip markers, tolerance checks, each op's random inputs,
and one table of the ops (entry point, torch reference, Triton launcher, inputs it refuses).

tests/test_kernel_contract.py checks the contract for every op in OPS; each op's numerical
tests stay in its own tests/test_kernel_<op>.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import pytest
import torch

import engine.kernels._dispatch as dispatch
from engine.kernels import (
    contrastive_hinge,
    contrastive_hinge_reference,
    guidance_loss,
    guidance_loss_reference,
    stacked_transform,
    stacked_transform_reference,
    weighted_gram,
    weighted_gram_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# conftest sets TRITON_INTERPRET=1, so on CPU the kernel runs through Triton's interpreter.
needs_triton = pytest.mark.skipif(
    not dispatch.triton_can_run(torch.empty(0, device=DEVICE)), reason="Triton cannot run here"
)
# The interpreter's bf16 is unreliable (tl.dot on bf16 is wrong, fp32 -> bf16 casts truncate).
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 is checked on CUDA only, not in the Triton interpreter")


def assert_close(actual, expected, atol, rtol):
    """Same dtype and shape, and close: atol is relative to the largest |expected| entry."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


# Inputs of each op -------------------------------------------------------------------------

def gram_inputs(D, N, Ns, Nt, dtype, seed=0, device=DEVICE):
    """weighted_gram's inputs: random tables, indices with repeats (N > Ns in places), positive weights."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(Ns, D, generator=g).to(device=device, dtype=dtype)
    tgt = torch.randn(Nt, D, generator=g).to(device=device, dtype=dtype)
    # Draw from a third of the rows so that indices repeat even for small N.
    src_index = torch.randint(0, max(1, Ns // 3), (N,), generator=g).to(device)
    tgt_index = torch.randint(0, Nt, (N,), generator=g).to(device)
    weight = (torch.rand(N, generator=g) + 0.1).to(device=device, dtype=dtype)
    return src, tgt, weight, src_index, tgt_index


def kv_inputs(R, D, w_dtype, t_dtype, seed=0, device=DEVICE):
    """stacked_transform's inputs: R stacked weight rows and a well-conditioned D x D transform."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(R, D, generator=g).to(device=device, dtype=w_dtype)
    transform = (torch.eye(D) + torch.randn(D, D, generator=g) / D**0.5).to(device=device, dtype=t_dtype)
    return weights, transform


def rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def loss_inputs(B, N, K, dtype, seed, with_mask):
    """guidance_loss's inputs: pred (B, N), K frozen predictions, coefficients, a mask or None."""
    pred, frozen = rand((B, N), seed, dtype), rand((B, K, N), seed + 1, dtype)
    coeffs = rand((B, K), seed + 2, dtype)
    mask = (rand((B, N), seed + 3) > 0).to(dtype) * rand((B, N), seed + 4).abs().to(dtype) if with_mask else None
    return pred, frozen, coeffs, mask


def hinge_inputs(B, N, dtype, seed):
    """contrastive_hinge's inputs: an anchor and targets near it on some samples and far on others,
    so the hinge is active on some samples and not on others."""
    anchor = rand((B, N), seed, dtype)
    safe = (anchor.float() + rand((B, N), seed + 1) * torch.linspace(0.2, 2, B, device=DEVICE)[:, None]).to(dtype)
    unsafe = (anchor.float() + rand((B, N), seed + 2) * torch.linspace(2, 0.2, B, device=DEVICE)[:, None]).to(dtype)
    return anchor, safe, unsafe


# Inputs each op refuses: (case, () -> (args, kwargs), message of the ValueError) -------------

def _gram_bad(**change):
    """Valid weighted_gram inputs with some replaced."""
    src, tgt, weight, si, ti = gram_inputs(8, 5, 6, 7, torch.float32)
    args = {"src": src, "tgt": tgt, "weight": weight, "src_index": si, "tgt_index": ti}
    for k, v in change.items():
        t = v(args)
        args[k] = t if t.device.type == "meta" else t.to(DEVICE)
    return tuple(args.values()), {}


GRAM_BAD_INPUTS = [
    ("mismatched D", lambda: _gram_bad(tgt=lambda a: torch.randn(7, 9)), "same width D"),
    ("1-D table", lambda: _gram_bad(src=lambda a: torch.randn(48)), "src must be 2-D"),
    ("int table", lambda: _gram_bad(src=lambda a: torch.ones(6, 8, dtype=torch.int32)), "fp32/fp16/bf16"),
    ("int32 index", lambda: _gram_bad(src_index=lambda a: a["src_index"].int()), "src_index must be a 1-D int64"),
    ("float index", lambda: _gram_bad(tgt_index=lambda a: a["tgt_index"].float()), "tgt_index must be a 1-D int64"),
    ("2-D index", lambda: _gram_bad(src_index=lambda a: a["src_index"][:, None]), "1-D int64"),
    ("index lengths", lambda: _gram_bad(tgt_index=lambda a: a["tgt_index"][:4]), "same length"),
    ("weight length", lambda: _gram_bad(weight=lambda a: a["weight"][:4]), r"weight must have shape \(5,\)"),
    ("index too big", lambda: _gram_bad(src_index=lambda a: torch.tensor([0, 1, 6, 2, 3])),
     r"src_index must lie in \[0, 6\)"),
    ("negative index", lambda: _gram_bad(tgt_index=lambda a: torch.tensor([0, -1, 2, 3, 4])),
     r"tgt_index must lie in \[0, 7\)"),
    ("two devices", lambda: _gram_bad(weight=lambda a: torch.ones(5, device="meta")), "one device"),
]


def _kv_bad(w_shape=(5, 8), t_shape=(8, 8), w_dtype=torch.float32, t_dtype=torch.float32, t_device=DEVICE):
    return (torch.randn(w_shape).to(DEVICE, w_dtype), torch.randn(t_shape).to(t_device, t_dtype)), {}


KV_BAD_INPUTS = [
    ("mismatched D", lambda: _kv_bad(t_shape=(9, 9)), r"transform must be \(8, 8\)"),
    ("non-square transform", lambda: _kv_bad(t_shape=(8, 6)), r"transform must be \(8, 8\)"),
    ("1-D weights", lambda: _kv_bad(w_shape=(8,)), "weights must be 2-D"),
    ("int weights", lambda: _kv_bad(w_dtype=torch.int32), "weights must be fp32/fp16/bf16"),
    ("fp64 weights", lambda: _kv_bad(w_dtype=torch.float64), "weights must be fp32/fp16/bf16"),
    ("fp16 transform", lambda: _kv_bad(t_dtype=torch.float16), "transform must be fp32 or fp64"),
    ("two devices", lambda: _kv_bad(t_device="meta"), "one device"),
]


def _loss_bad(change):
    pred, frozen, coeffs, _ = loss_inputs(2, 10, 2, torch.float32, seed=1, with_mask=False)
    return change(pred, frozen, coeffs), {}


LOSS_BAD_INPUTS = [
    ("frozen width", lambda: _loss_bad(lambda p, f, c: (p, f[:, :, :9], c)), r"frozen must be \(2, K, 10\)"),
    ("coeffs shape", lambda: _loss_bad(lambda p, f, c: (p, f, c[:, :1])), r"coeffs must be \(2, 2\)"),
    ("mask shape", lambda: _loss_bad(lambda p, f, c: (p, f, c, p[:, :3])), r"mask must be \(2, 10\)"),
    ("no frozen predictions", lambda: _loss_bad(lambda p, f, c: (p, f[:, :0], c[:, :0])), "K = 0"),
    ("fp64 pred", lambda: _loss_bad(lambda p, f, c: (p.double(), f, c)), "fp32/fp16/bf16"),
]


def _hinge_bad(change, **kwargs):
    return change(*hinge_inputs(2, 10, torch.float32, seed=1)), kwargs


HINGE_BAD_INPUTS = [
    ("safe shape", lambda: _hinge_bad(lambda a, s, u: (a, s[:, :5], u)), "safe must have anchor's shape"),
    ("beta 0", lambda: _hinge_bad(lambda a, s, u: (a, s, u), beta=0.0), "beta must be > 0"),
    ("1-D anchor", lambda: _hinge_bad(lambda a, s, u: (a[0], s[0], u[0])), "anchor must be"),
]


# The ops ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelOp:
    """One op: its entry point (taking ``backend=``), its torch reference, the module holding it
    and the name of its Triton launcher there, argument tuples it accepts, and inputs it refuses."""

    name: str
    fn: Callable
    reference: Callable
    module: ModuleType
    launcher: str
    valid: tuple[Callable[[], tuple], ...]
    invalid: list

    def __str__(self) -> str:
        return self.name


OPS = [
    KernelOp("weighted_gram", weighted_gram, weighted_gram_reference, importlib.import_module("engine.kernels.gram"),
             "_launch_weighted_gram",
             (lambda: gram_inputs(37, 53, 90, 70, torch.float32), lambda: gram_inputs(16, 10, 20, 20, torch.float32)),
             GRAM_BAD_INPUTS),
    KernelOp("stacked_transform", stacked_transform, stacked_transform_reference,
             importlib.import_module("engine.kernels.kv_update"), "_launch_stacked_transform",
             (lambda: kv_inputs(75, 37, torch.float16, torch.float64), lambda: kv_inputs(20, 16, torch.float32, torch.float32)),
             KV_BAD_INPUTS),
    KernelOp("guidance_loss", guidance_loss, guidance_loss_reference,
             importlib.import_module("engine.kernels.guidance_loss"), "_launch",
             (lambda: loss_inputs(3, 37, 2, torch.float32, seed=2, with_mask=True),
              lambda: loss_inputs(2, 999, 2, torch.float16, seed=3, with_mask=False)),
             LOSS_BAD_INPUTS),
    KernelOp("contrastive_hinge", contrastive_hinge, contrastive_hinge_reference,
             importlib.import_module("engine.kernels.contrastive_hinge"), "_launch",
             (lambda: hinge_inputs(4, 37, torch.float32, seed=2), lambda: hinge_inputs(3, 999, torch.float16, seed=3)),
             HINGE_BAD_INPUTS),
]
