"""RECE: Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong et al., ECCV
2024, arXiv 2407.12383), from the official code (github.com/CharlesGong12/RECE @403a67f: train.py,
train_artists.py, train_object.py, utils/embedding_calculation/close_form_emb.py,
erase_methods/uce.py). W_l: every cross-attention to_k and to_v (with_to_k=True) of the original
model, W'_l the edited one; on the shared solve every edit is W'_l = W_l T with one D x D T.

1. UCE (the engine's ``uce`` preset; the official runs load a UCE checkpoint, --target_ckpt).
2. ``epochs`` times (train.py l.228-260):
   a. for every row c of every concept prompt, the embedding that makes the EDITED model's
      projections regenerate what the ORIGINAL model makes of c (close_form_emb.py l.132-209,
      close_form_emb_regzero):
          c' = argmin_x sum_l ||W'_l x - W_l c||^2 + lam ||x||^2
             = (lam I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c
             = (lam I + T^T G T)^-1 T^T G c,   G = sum_l W_l^T W_l       (``adversarial_map``)
   b. erase every c' at once towards its anchor row n with preservation (erase_methods/uce.py
      l.9-109, edit_model_adversarial, technique "replace"):
          W''_l = (l1 W'_l + e sum_i W'_l n_i c'_i^T + l2 sum_j W'_l p_j p_j^T)
                  (l1 I + e sum_i c'_i c'_i^T + l2 sum_j p_j p_j^T)^-1
      i.e. the shared solve (engine/closed_form.py) with rows c' -> n, ridge l1, preservation l2.
Rows (close_form_emb.py l.197-200: the slice to the last token is commented out): all 77 of each
concept prompt ("{}" filled with the name, train.py l.133) and of its anchor prompt (--guided_
concepts, " " when none, l.136), position by position; preserved: all 77 rows of "" (l.155) and
of each preserved prompt. Defaults: train.py's argparse (l.43-58; the nudity run of
scripts/nudity.sh): 3 epochs, lam (--regular_scale) 0.1, l1 and l2 (the paper's Eq. 3 lambda_1 and
lambda_2: --lamb, --preserve_scale) 0.1, e (--erase_scale) 1. Presets, from the README's settings:
unsafe (I2P concepts: 2 epochs), art and object-hard (lam 1e-3, 1 epoch; art also UCE's own
preservation weight rule, as its UCE checkpoints), object-easy (1 epoch).

Deviations from the official code:
* Stage 1 is the engine's ``uce`` (engine/methods/uce.py: the last token before [EoT]); the
  official checkpoints come from UCE's first release (the last concept token and every row after
  it, the empty prompt preserved). ``uce_tokens`` / ``uce_preserve_weight`` / ``uce_ridge`` set it.
* Prompts and weights: every template of a concept (official: the bare name, the default "{}"), a
  concept's weight multiplies its rows; a concept's own ``tokens`` chooses its rows (default all).
* Preservation: the empty prompt once (as train_artists.py / train_object.py; train.py adds " "
  once per concept: the same for one concept) and the concept file's preserved concepts (each
  template, all 77 rows) and captions ([SOT] to [EoT], as the engine's other solves); the
  official art runs preserve every other artist of artists1734_prompts.csv unless told, and
  train.py samples as many preserved concepts as erased ones (l.158); every listed one is kept.
* sum_l W'_l^T W'_l and W'_l^T W_l come from the original's Gram G and the accumulated T (exact
  for the engine's edits W' = W T). The D x D systems are solved in float64 on the CPU (official:
  float32 torch.inverse per layer); an ill-conditioned one with clamped eigenvalues (a warning).
* No image generation or per-epoch detection (official: the epoch with the lowest nudity / Q16 /
  classifier rate is kept); the model after the last epoch is the result.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from engine.closed_form import (
    GRAM_DTYPES, ClosedFormConfig, EditRows, PhaseTimer, accumulate, apply_transform, caption_gram, closed_form_edit,
    collect_rows, cross_attention_kv, fit_report, gram_root, kv_gram, solve_transform,
)
from engine.concepts import TOKEN_MODES, ConceptSet
from engine.finetune.config import check_choices, check_numbers, check_positive_ints
from engine.kernels import weighted_gram
from engine.methods.base import Method, Outcome
from engine.methods.uce import UCE
from engine.settings import Settings


@dataclass(frozen=True)
class RECEConfig(Settings):
    """RECE's settings, train.py's argparse defaults (module docstring). Validated on construction."""

    epochs: int = 3  # derive-and-erase rounds after UCE (0: UCE alone)
    embedding_reg: float = 0.1  # lam: the ridge of c' (--regular_scale, close_regzero)
    ridge: float = 0.1  # l1: pulls each epoch's edit towards the current weights (--lamb)
    preserve_weight: float = 0.1  # l2: the preserved rows (--preserve_scale)
    erase_weight: float = 1.0  # e: multiplies every concept's weight (--erase_scale)
    tokens: str = "all"  # rows of each concept prompt and its anchor (a concept's own tokens win)
    uce_tokens: str = "last"  # stage 1, the uce preset's
    uce_preserve_weight: float | None = 1.0  # stage 1; None: UCE's max(0.1, 1 / #prompts)
    uce_ridge: float = 0.5  # stage 1
    max_condition: float = 1e12  # above this the solves clamp eigenvalues
    batch_size: int = 64  # prompts per text-encoder call
    backend: str = "auto"  # kernels: auto | triton | torch
    gram_dtype: str = "float64"  # Gram accumulation
    cache_dir: str | None = None  # the empty prompt's and captions' Gram cache (closed_form.caption_gram)
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"config field 'epochs' must be an integer >= 0, got {self.epochs!r}")
        check_numbers(self, ("embedding_reg", "ridge", "preserve_weight", "erase_weight", "uce_ridge"),
                      nullable=("uce_preserve_weight",), positive=("erase_weight",))
        check_choices(self, {"tokens": TOKEN_MODES, "uce_tokens": TOKEN_MODES, "backend": ("auto", "triton", "torch"),
                             "gram_dtype": tuple(GRAM_DTYPES)})
        check_positive_ints(self, ("batch_size",))
        if isinstance(self.max_condition, bool) or not isinstance(self.max_condition, (int, float)) or not (
                1 < self.max_condition < math.inf):
            raise ValueError(f"config field 'max_condition' must be a finite number > 1, got {self.max_condition!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"config field 'progress' must be true or false, got {self.progress!r}")

    def uce_config(self) -> ClosedFormConfig:
        """Stage 1's settings: the uce preset with ``uce_*`` and the shared numerics."""
        return UCE.defaults.replace(tokens=self.uce_tokens, preserve_weight=self.uce_preserve_weight,
                                    ridge=self.uce_ridge, **self.numerics())

    def epoch_config(self) -> ClosedFormConfig:
        """Each epoch's erase (step b) on the shared solve; its rows also select c and n."""
        return ClosedFormConfig(tokens=self.tokens, erase_weight=self.erase_weight,
                                preserve_weight=self.preserve_weight, ridge=self.ridge, **self.numerics())

    def numerics(self) -> dict:
        """The settings both solves share."""
        return {k: getattr(self, k) for k in ("max_condition", "batch_size", "backend", "gram_dtype", "cache_dir",
                                              "progress")}


def adversarial_map(G: torch.Tensor, T: torch.Tensor, reg: float, max_condition: float = 1e12):
    """(A, solver, condition): c' = A c minimises sum_l ||W_l T c' - W_l c||^2 + reg ||c'||^2 for the
    layers W_l with G = sum_l W_l^T W_l (``kv_gram`` of the original) edited to W_l T, i.e.
    A = (T^T G T + reg I)^-1 T^T G (D x D float64, CPU). On the shared solve: solve_transform
    returns C S^-1 = G T (T^T G T + reg I)^-1 = A^T (G is symmetric)."""
    G, T = G.double().cpu(), T.double().cpu()
    S = T.T @ G @ T + reg * torch.eye(G.shape[0], dtype=torch.float64)
    At, solver, cond = solve_transform(S, G @ T, 0.0, max_condition)
    return At.T, solver, cond


def per_concept(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums over each concept's rows of the squared row norms of x (rows, D)."""
    return torch.zeros(n, dtype=torch.float64).index_add_(0, owner, x.double().square().sum(1))


def regeneration(R: torch.Tensor, T: torch.Tensor, adv: torch.Tensor, c: torch.Tensor, owner, n: int) -> torch.Tensor:
    """Per concept ||W T c' - W c|| / ||W c|| over its rows and every layer (R^T R = G): how close
    the found embeddings c' bring the edited model to what the original made of c (0: exactly)."""
    return (per_concept((adv @ T.T - c) @ R.T, owner, n) / per_concept(c @ R.T, owner, n).clamp_min(1e-300)).sqrt()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf


class EpochRows:
    """What every epoch reuses: the concept rows c and their anchor rows n (``collect_rows``' edit
    rows), the preservation Gram (the file's preserved rows and captions as ``collect_rows`` chose
    them, and the 77 rows of the empty prompt: summed once, unweighted) and G of the original."""

    def __init__(self, pipe, concepts: ConceptSet, ccfg: ClosedFormConfig, G: torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the edit preserves nothing", category=UserWarning)
            rows = collect_rows(pipe, concepts, ccfg)  # the empty prompt is preserved below
        n, pres = rows.n_edit, rows.src_index[rows.n_edit :]
        P, n_empty = caption_gram(pipe, [""], ccfg, padding=True)
        P = P.double().cpu()
        if len(pres):
            P += weighted_gram(rows.table, rows.table, torch.ones(len(pres), device=rows.table.device), pres, pres,
                               out_dtype=GRAM_DTYPES[ccfg.gram_dtype], backend=ccfg.backend)[0].double().cpu()
        if rows.caption_gram is not None:
            P += rows.caption_gram.double().cpu()
        self.P, self.n_preserve = P, len(pres) + rows.caption_rows + n_empty
        self.rows, self.n, self.weight, self.owner = rows, n, rows.weight[:n], rows.owner[:n]
        self.c = rows.table[rows.src_index[:n]].double().cpu()  # (n, D) concept rows
        self.anchors = rows.table[rows.tgt_index[:n]]  # (n, D) their anchor rows, on the encoder's device
        self.names, self.G, self.R = [c.name for c in concepts.concepts], G, gram_root(G)
        self.preserve_weight, self.preserved = ccfg.preserve_weight, {**rows.preserved, "empty_prompt": True}

    def erase_rows(self, src: torch.Tensor) -> EditRows:
        """The rows src -> n with the preservation (step b's sums on the shared solve)."""
        index = torch.arange(self.n, device=self.anchors.device)
        table = torch.cat([src.to(self.anchors.device, self.anchors.dtype), self.anchors])
        return EditRows(table=table, src_index=index, tgt_index=index + self.n, weight=self.weight, owner=self.owner,
                        n_edit=self.n, preserve_weight=self.preserve_weight, caption_gram=self.P,
                        caption_rows=self.n_preserve, preserved=self.preserved)

    def norms(self, x: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.names, per_concept(x, self.owner, len(self.names)).sqrt().tolist()))

    def derive(self, T: torch.Tensor, cfg: RECEConfig) -> tuple[torch.Tensor, dict]:
        """c' of every concept row on the model W T (step a), and what it reaches."""
        A, solver, cond = adversarial_map(self.G, T, cfg.embedding_reg, cfg.max_condition)
        adv = self.c @ A.T
        reached = regeneration(self.R, T, adv, self.c, self.owner, len(self.names))
        return adv, {"solver": solver, "condition": _finite(cond), "norm": self.norms(adv),
                     "regeneration_residual": dict(zip(self.names, reached.tolist()))}


def rece_edit(pipe, concepts: ConceptSet, cfg: RECEConfig) -> Outcome:
    """UCE, then ``cfg.epochs`` rounds of closed-form adversarial embeddings erased on the shared
    solve (module docstring), written into ``pipe.unet``'s cross-attention K/V."""
    timer, kv, ccfg = PhaseTimer(), cross_attention_kv(pipe.unet), cfg.epoch_config()
    with timer("report"):
        G = kv_gram(kv)  # of the original weights: every later K/V matrix is W T
    stage1 = closed_form_edit(pipe, concepts, cfg.uce_config())
    changed, T_total, epochs = stage1.changed, stage1.transform.double().cpu(), []
    with timer("text_encoding"):
        data = EpochRows(pipe, concepts, ccfg, G)
    for _ in range(cfg.epochs):
        with timer("embedding"):
            adv, found = data.derive(T_total, cfg)
        with timer("gram"):
            rows = data.erase_rows(adv)
            S, C = accumulate(rows, ccfg.backend, ccfg.gram_dtype)
        with timer("solve"):
            T, solver, cond = solve_transform(S, C, ccfg.ridge, ccfg.max_condition)
        with timer("weight_update"):
            changed = apply_transform(kv, T, ccfg.backend)
        with timer("report"):
            residual, _, drift = fit_report(rows, T, T_total.T @ G @ T_total, concepts)
        T_total = T_total @ T
        epochs.append({"embedding": found, "erase": {"solver": solver, "condition": _finite(cond),
                                                     "concept_residual": residual, "preserve_drift": drift}})
    with timer("report"):
        _, final = data.derive(T_total, cfg)  # what the closed form now finds on the result
        residual, before, drift = fit_report(data.erase_rows(data.c), T_total, G, concepts)  # c -> n, all of RECE
    clamped = [s for s in [stage1.solver] + [e["erase"]["solver"] for e in epochs] if s != "cholesky"]
    solve = {
        "solver": f"uce, then {cfg.epochs} RECE epoch(s): {clamped[0] if clamped else 'cholesky'}",
        "layers_changed": len(changed), "epochs_run": cfg.epochs,
        "rows": {"edit": data.n, "preserve": data.n_preserve, "caption": data.rows.caption_rows},
        "concept_residual": residual, "concept_residual_before": before, "preserve_drift": drift,
        "concept_embedding_norm": data.norms(data.c), "epochs": epochs, "final_embedding": final,
        "preserved": data.preserved,
        "stage1": {"solver": stage1.solver, "condition": _finite(stage1.condition), "rows": stage1.rows,
                   "preserve_weight": stage1.preserve_weight, "concept_residual": stage1.concept_residual,
                   "preserve_drift": stage1.preserve_drift},
    }
    timings = {**{f"uce_{k}": v for k, v in stage1.timings.items()}, **timer.seconds}
    return Outcome(changed=changed, timings=timings, manifest={"seed": None, "solve": solve}, edit=None)


@dataclass(frozen=True)
class RECEMethod(Method):
    """UCE, then RECE's derive-and-erase epochs (module docstring)."""

    def touched(self, unet, cfg) -> set[str]:
        return {key for key, _ in cross_attention_kv(unet)}

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        self.check_settings(cfg)
        return rece_edit(pipe, concepts, cfg)


RECE = RECEMethod(
    name="rece", defaults=RECEConfig(),
    summary="RECE: UCE, then closed-form embeddings that regenerate the concept on the edited model, erased "
            "in turn (Gong et al., ECCV 2024)",
    # The README's settings per kind of concept (the defaults are the nudity run's).
    presets={"unsafe": {"epochs": 2}, "art": {"epochs": 1, "embedding_reg": 1e-3, "uce_preserve_weight": None},
             "object-hard": {"epochs": 1, "embedding_reg": 1e-3}, "object-easy": {"epochs": 1}},
)
