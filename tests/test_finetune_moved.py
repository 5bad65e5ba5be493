"""The end-of-run check that a fine-tuning run moved the erased concepts' predictions
(``Objective.moved``): a run that learnt nothing warns, one that erases does not, and the
manifest records the measured fraction."""

import warnings

import pytest
import torch

import engine
from engine.concepts import concepts_from_names
from engine.finetune.frozen import Prompts, build_trajectory_cache, guidance_moved
from engine.methods import finetune
from engine.methods.esd import ESDConfig
from engine.models import load_pipeline

CONCEPTS = concepts_from_names(["Van Gogh"], templates=["{}", "a painting of {}"])
QUICK = dict(batch_size=2, sample_steps=4, trajectories=1, progress=False, checkpoint_every=0)


def _run(tiny_sd_dir, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = finetune(load_pipeline(tiny_sd_dir), CONCEPTS, ESDConfig(**{**QUICK, **kw}))
    return run, [str(w.message) for w in caught if "predictions moved" in str(w.message)]


def test_a_run_that_learns_nothing_warns(tiny_sd_dir):
    run, warned = _run(tiny_sd_dir, iterations=2, lr=1e-12)
    assert run.moved is not None and run.moved < 0.01
    assert len(warned) == 1 and "--preset toy" in warned[0] and "iterations" in warned[0]


def test_a_run_that_erases_does_not_warn(tiny_sd_dir):
    from engine.finetune.trainer import MOVED_WARNING

    run, warned = _run(tiny_sd_dir, iterations=30, lr=3e-3)
    assert run.moved > MOVED_WARNING and not warned


def test_moved_is_zero_for_the_frozen_model_and_one_at_the_target(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    cfg = ESDConfig(**QUICK)
    prompts = Prompts(pipe, CONCEPTS, False)
    cache = build_trajectory_cache(pipe, prompts, cfg)
    assert guidance_moved(pipe.unet, cache, prompts, cfg.eta) == pytest.approx(0.0, abs=1e-4)

    class AtTarget(torch.nn.Module):  # predicts the negative-guidance target exactly
        device, dtype = pipe.unet.device, pipe.unet.dtype

        def forward(self, x, t, cond):
            hits = [(r, s) for r in range(cache["x"].shape[0]) for s in range(cache["x"].shape[1])
                    if torch.equal(cache["x"][r, s], x[0].cpu())]
            r, s = hits[0]
            sample = 2 * cache["eps_uncond"][r, s] - cache["eps_cond"][r, s]  # eta 1: eps_u - (eps_c - eps_u)
            return type("Out", (), {"sample": sample[None].expand_as(x).clone()})

    moved = guidance_moved(AtTarget(), cache, prompts, cfg.eta, samples=1)
    assert moved == pytest.approx(1.0, abs=1e-4)


def test_the_manifest_records_the_fraction(tiny_sd_dir):
    result = engine.erase(str(tiny_sd_dir), CONCEPTS, method="esd", iterations=2, lr=1e-12, **QUICK)
    assert 0 <= result.manifest["training"]["moved_to_target"] < 0.01
