"""Closed-form editing of the cross-attention key/value projections (UCE, TRCE stage 1).

Every cross-attention layer l projects the same text embedding e with W_l (`to_k`, `to_v`).
The edit solves, for all layers at once,

    min_W'  sum_i w_i ||W' e_i - W e'_i||^2 + lam sum_j ||W' p_j - W p_j||^2 + mu ||W' - W||_F^2

whose solution is W'_l = W_l T with ONE D x D matrix shared by every layer:

    T = (C + lam P + mu I) (S + lam P + mu I)^-1,
    S = sum_i w_i e_i e_i^T,  C = sum_i w_i e'_i e_i^T,  P = sum_j p_j p_j^T.

Rows e_i are source token embeddings (a concept's prompt), e'_i the aligned target rows
(the same template with the anchor), p_j preservation rows (retained concepts, captions).
Which token positions carry the edit is `tokens` (the config's, or a concept's own):

* ``last``: the last token before the first end-of-text -> the target prompt's own last token
  before its end-of-text (the start token for an empty anchor). UCE's rows (Gandikota et al.,
  WACV 2024, `trainscripts/uce_sd_erase.py`: ``attention_mask.sum() - 2`` of each string).
* ``eot``: the first end-of-text position of the source prompt -> that of the target.
* ``concept``: the concept's own tokens and every later token up to the first end-of-text
  (CLIP's causal attention lets all of them see the concept), aligned to the target from the
  end-of-text backwards and clamped at the anchor's first token.
* ``all``: all 77 positions, position by position.

Preservation rows of retained concepts use the same positions as the edit; caption rows are
every position from the start token to the first end-of-text.

Only rows that are needed are kept after encoding, so memory grows with the number of
selected rows, not with the number of prompts times 77.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import string
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine import prior
from engine.concepts import TOKEN_MODES, ConceptSet
from engine.export import cache_root, read_safetensors
from engine.models import PromptTooLongError, encode_prompts, text_encoder_fingerprint, tokenize_prompts
from engine.progress import progress_bar
from engine.settings import Settings
from engine.tokenizer import MAX_LENGTH
from engine.kernels import transform_each, weighted_gram

# The solve multiplies the Gram's relative rounding error by its condition number (2e5 to 8e7 for
# 1 to 1000 concepts on SD1.5-size encoders in benchmarks/bench_closed_form.py), where fp32 sums
# moved the edited weights by 3e-4 to 0.4 relative to an exact solve; fp64 sums keep fp32 round-off.
GRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}
PRIORS = ("none", "generic")
AUTO = "auto"  # preserve_weight chosen from the data (choose_preserve_weight)
PRESERVE_GRID = tuple(10.0 ** (k / 4) for k in range(-20, 13))  # 1e-5 .. 1e3, four steps a decade
# The most of a concept's distance to its anchor an automatic weight may leave. Measured on the
# toy worlds (10 identities, the demo's edit): at text width 768 (v2) a residual of 0.41 left 48%
# of the erased images recognised, 0.33 left 22% and 0.21 left 2%, with 99% of the rest kept at
# each; at width 96 (v1) 0.5 was already enough. Erasing is what the user asked for: 0.2.
AUTO_RESIDUAL = 0.2
# uce-plus refuses an edit that moves the generic prior (``prior_drift``) further than this.
# Measured on toy world v2 (uce-plus, names alone; benchmarks/results/toy_scale.json): a drift
# of 0.033 (10 identities) kept 95.8% of the other concepts recognised, 0.108 (100, balanced)
# 84.3%, 0.145 (100) 60.5% and 1.04 (300) 0.3%; the demo's edit (everything else listed) 0.078.
PRIOR_DRIFT_LIMIT = 0.1
# balance_concepts: solves per tried weight, and the slack on the rule the reweighting may end at.
BALANCE_ITERATIONS = 12
BALANCE_TOLERANCE = 1.01


class EditRefusedError(ValueError):
    """The solve would damage the model past ``max_prior_drift``; nothing was written."""

    def __init__(self, message: str, drift: float):
        super().__init__(message)
        self.drift = drift


@dataclass(frozen=True)
class ClosedFormConfig(Settings):
    """Hyper-parameters of one closed-form edit. Validated on construction."""

    tokens: str = "concept"  # which token positions carry the edit: last | eot | concept | all
    erase_weight: float = 1.0  # multiplies every concept's own weight (w_i)
    preserve_weight: float | str | None = None  # lam; None: UCE's max(0.1, 1 / #prompts); "auto": choose_preserve_weight
    ridge: float = 0.1  # mu, pulls W' towards W; keeps the system well posed
    max_condition: float = 1e12  # above this the solve falls back to a clamped eigen-solve
    batch_size: int = 64  # prompts per text-encoder call
    backend: str = "auto"  # kernels: auto | triton | torch
    gram_dtype: str = "float64"  # Gram accumulation: float64 (the solve amplifies rounding) | float32
    cache_dir: str | None = None  # caption Gram cache; None: $ERASURE_CACHE or ~/.cache/erasure-engine
    prior: str = "none"  # none | generic: also keep the empty prompt, generic captions, frequent words (engine/prior.py)
    neighbours: int = 0  # per word position of a multi-word name: neighbour names to preserve (prior.name_neighbours)
    skip_shared_rows: bool = False  # skip edit rows whose token prefix a preserved prompt shares
    max_prior_drift: float | None = None  # refuse an edit whose prior_drift exceeds this (None: never)
    balance_concepts: bool = False  # preserve_weight=auto: raise the weight of concepts left furthest from their anchor
    progress: bool = True

    def __post_init__(self):
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"config field 'tokens' must be one of {TOKEN_MODES}, got {self.tokens!r}")
        for name in ("erase_weight", "ridge", "max_condition"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"config field {name!r} must be a finite number, got {value!r}")
        if self.erase_weight <= 0:
            raise ValueError(f"config field 'erase_weight' must be > 0, got {self.erase_weight}")
        if self.ridge < 0:
            raise ValueError(f"config field 'ridge' must be >= 0, got {self.ridge}")
        if self.max_condition <= 1:
            raise ValueError(f"config field 'max_condition' must be > 1, got {self.max_condition}")
        if self.preserve_weight is not None and self.preserve_weight != AUTO and (
            not isinstance(self.preserve_weight, (int, float))
            or not math.isfinite(self.preserve_weight)
            or self.preserve_weight < 0
        ):
            raise ValueError(f"config field 'preserve_weight' must be a number >= 0, 'auto' or null, got {self.preserve_weight!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"config field 'batch_size' must be a positive integer, got {self.batch_size!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"config field 'backend' must be auto, triton or torch, got {self.backend!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"config field 'prior' must be one of {PRIORS}, got {self.prior!r}")
        if not isinstance(self.neighbours, int) or isinstance(self.neighbours, bool) or self.neighbours < 0:
            raise ValueError(f"config field 'neighbours' must be an integer >= 0, got {self.neighbours!r}")
        if self.max_prior_drift is not None and (
            not isinstance(self.max_prior_drift, (int, float)) or isinstance(self.max_prior_drift, bool)
            or not math.isfinite(self.max_prior_drift) or self.max_prior_drift <= 0
        ):
            raise ValueError(f"config field 'max_prior_drift' must be a number > 0 or null, got {self.max_prior_drift!r}")
        if not isinstance(self.balance_concepts, bool):
            raise ValueError(f"config field 'balance_concepts' must be true or false, got {self.balance_concepts!r}")
        if self.balance_concepts and self.preserve_weight != AUTO:
            raise ValueError("config field 'balance_concepts' needs preserve_weight=auto (it balances the automatic search)")
        if self.gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"config field 'gram_dtype' must be one of {tuple(GRAM_DTYPES)}, got {self.gram_dtype!r}")



# The named presets of this solve (uce, uce-plus, trce-stage1) live in engine/methods/.


@dataclass
class ClosedFormEdit:
    """What one solve produced: the transform, the changed weights and how well it fits."""

    transform: torch.Tensor  # (D, D) float64, W' = W @ transform
    changed: dict[str, torch.Tensor]  # UNet state-dict key -> edited weight
    concept_residual: dict[str, float]  # ||W T e - W e'|| / ||W e'|| over the concept's rows, all layers
    concept_residual_before: dict[str, float]  # ||W e - W e'|| / ||W e'||: how far the concept started
    preserve_drift: float  # ||W (T - I) p|| / ||W p|| over all preservation and caption rows, all layers
    solver: str  # "cholesky" or "eigen-clamped"
    condition: float  # the solved system's condition number, lambda_max / lambda_min
    rows: dict[str, int]  # how many edit / preservation / caption rows entered the sums
    preserve_weight: float  # the lam actually used
    timings: dict[str, float]  # seconds per phase
    preserved: dict = dataclasses.field(default_factory=dict)  # what the edit preserved (EditRows.preserved)
    preserve_weight_search: dict | None = None  # preserve_weight="auto": the weights tried and their fit
    prior_drift: float | None = None  # ||W (T - I) p|| / ||W p|| over the generic prior's rows (max_prior_drift set)


# --------------------------------------------------------------------------- helpers


class PhaseTimer:
    """Collects wall time per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def cross_attention_kv(unet) -> list[tuple[str, torch.nn.Linear]]:
    """(state-dict key of the weight, module) for every cross-attention to_k and to_v."""
    from diffusers.models.attention_processor import Attention

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            for proj in ("to_k", "to_v"):
                found.append((f"{name}.{proj}.weight", getattr(module, proj)))
    if not found:
        raise ValueError("the UNet has no cross-attention layers to edit")
    return found


def prefix_end(tokenizer, template: str) -> int:
    """Position right after the template's text before {} (1 counts the start token)."""
    prefix = ""
    for literal, field, _, _ in string.Formatter().parse(template):  # braces come back unescaped
        prefix += literal
        if field is not None:
            break
    return 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)


def span_start(tokenizer, template: str, fill: str, ids: list[int], where: str) -> int:
    """Position of the first token of `fill` inside template.format(fill), from real ids."""
    start = prefix_end(tokenizer, template)
    fill_ids = tokenizer(fill, add_special_tokens=False).input_ids
    if ids[start : start + len(fill_ids)] == fill_ids:
        return start
    # A template that glues text to {} can merge the name with its neighbour; find it instead.
    for pos in range(1, len(ids) - len(fill_ids) + 1):
        if fill_ids and ids[pos : pos + len(fill_ids)] == fill_ids:
            return pos
    raise ValueError(f"{where}: cannot find the tokens of {fill!r} in the prompt {template.format(fill)!r}")


class RowPlan:
    """Collects (prompt, position) rows, encodes only what is needed, and keeps them compactly."""

    def __init__(self):
        self.prompts: dict[str, int] = {}
        self.rows: dict[tuple[int, int], int] = {}

    def prompt(self, text: str) -> int:
        return self.prompts.setdefault(text, len(self.prompts))

    def row(self, prompt_idx: int, position: int) -> int:
        return self.rows.setdefault((prompt_idx, position), len(self.rows))

    def encode(self, pipe, batch_size: int, progress: bool, desc: str) -> torch.Tensor:
        """The selected rows' embeddings, (n_rows, D) float32 (float64 from a float64 encoder), in row order."""
        keys = torch.tensor(list(self.rows), dtype=torch.int64).reshape(-1, 2)  # (n_rows, [prompt, position])
        texts = list(self.prompts)
        table = None
        for lo in progress_bar(range(0, len(texts), batch_size), desc=desc, progress=progress, unit="batch"):
            batch = texts[lo : lo + batch_size]
            mine = ((keys[:, 0] >= lo) & (keys[:, 0] < lo + len(batch))).nonzero().squeeze(1)  # rows of this batch
            # Encode only as far as the last position asked for (at least through each end-of-text).
            emb, _ = encode_prompts(pipe, batch, batch_size=batch_size,
                                    min_positions=int(keys[mine, 1].max()) + 1 if len(mine) else 1)  # (B, L, D)
            if table is None:
                table = torch.empty(len(self.rows), emb.shape[-1], dtype=emb.dtype, device=emb.device)
            table[mine.to(emb.device)] = emb[(keys[mine, 0] - lo).to(emb.device), keys[mine, 1].to(emb.device)]
        return table


def _tokenize(tokenizer, prompts: list[str]) -> list[list[int]]:
    return tokenize_prompts(tokenizer, prompts).tolist() if prompts else []


def token_positions(mode: str, tokenizer, template: str, fill: str, ids: list[int], eot_id: int, where: str) -> list[int]:
    eot = ids.index(eot_id)
    if mode == "last":
        return [eot - 1]
    if mode == "eot":
        return [eot]
    if mode == "all":
        return list(range(MAX_LENGTH))
    return list(range(span_start(tokenizer, template, fill, ids, where), eot + 1))


def aligned_targets(src_pos: list[int], src_eot: int, tgt_eot: int, tgt_lo: int) -> list[int]:
    """Align source rows to target rows counting back from each end-of-text."""
    return [max(tgt_eot - (src_eot - p), tgt_lo) for p in src_pos]


def _cache_dir(config: ClosedFormConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else cache_root()


def caption_gram(pipe, captions: list[str], config: ClosedFormConfig, padding: bool = False) -> tuple[torch.Tensor, int]:
    """sum_j p_j p_j^T over every real token of every caption (with ``padding``: all 77 positions,
    the padding rows after the end-of-text too, which cross-attention also reads), cached on disk.

    The cache key covers the text encoder(s)' weights, the captions in order and this row rule,
    so a changed model or list never reuses a stale matrix. Returns (gram, number of rows).
    """
    rule = "all" if padding else "bos..eot"
    key_src = json.dumps(
        {"encoder": text_encoder_fingerprint(pipe), "captions": captions, "rows": rule, "dtype": config.gram_dtype}
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = _cache_dir(config) / f"caption-gram-{key}.safetensors"
    if path.exists():
        try:
            cached, _ = read_safetensors(path, "caption Gram cache")
            return cached["gram"], int(cached["rows"].item())
        except (ValueError, KeyError) as err:  # a truncated or foreign file: recompute and replace it
            warnings.warn(f"ignoring an unreadable cache file ({err}); recomputing it", RuntimeWarning, stacklevel=2)

    tokenizer = pipe.tokenizer
    eot_id = tokenizer.eos_token_id
    plan = RowPlan()
    for text, ids in zip(captions, _tokenize(tokenizer, captions)):
        p = plan.prompt(text)
        for pos in range(MAX_LENGTH if padding else ids.index(eot_id) + 1):
            plan.row(p, pos)
    table = plan.encode(pipe, config.batch_size, config.progress, "encode captions")
    index = torch.arange(table.shape[0], device=table.device)
    ones = torch.ones(table.shape[0], device=table.device)
    gram, _ = weighted_gram(table, table, ones, index, index, out_dtype=GRAM_DTYPES[config.gram_dtype], backend=config.backend)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"gram": gram.contiguous(), "rows": torch.tensor([table.shape[0]])}, str(tmp))
        os.replace(tmp, path)
    except OSError as err:  # a cache is an optimisation: an unwritable folder must not fail the edit
        with suppress(OSError):
            tmp.unlink()
        warnings.warn(f"cannot write the caption Gram cache in {path.parent} ({err.strerror}); continuing "
                      "without it (set cache_dir or $ERASURE_CACHE to a writable folder)", RuntimeWarning, stacklevel=2)
    return gram, table.shape[0]


@contextmanager
def single_threaded():
    """One CPU thread while open. MKL's threaded symmetric eigensolver stalls when a core is busy
    (a 768 x 768 eigvalsh: 0.08 s on one thread, 11 s on two with the other core loaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def solve_transform(S: torch.Tensor, C: torch.Tensor, ridge: float, max_condition: float):
    """T = (C + ridge I) (S + ridge I)^-1 in float64 (preservation already inside S and C).

    The system's condition number is exact: lambda_max / lambda_min of the symmetric D x D matrix
    (its eigenvalues; D <= 2,048, a small part of a run). Cholesky when it is at most
    `max_condition`; otherwise an eigen-solve with eigenvalues clamped at
    lambda_max / max_condition, with a warning. Returns (T float64, solver, condition).
    """
    D = S.shape[0]
    eye = torch.eye(D, dtype=torch.float64)
    A = S.detach().double().cpu() + ridge * eye  # a D x D solve: the CPU in fp64 is exact and cheap
    A = 0.5 * (A + A.T)  # the kernel's accumulation order can leave last-bit asymmetries
    B = C.detach().double().cpu() + ridge * eye
    with single_threaded():
        evals = torch.linalg.eigvalsh(A)  # ascending
    cond = float(evals[-1] / evals[0]) if evals[0] > 0 else math.inf
    L, info = torch.linalg.cholesky_ex(A) if cond <= max_condition else (None, 1)
    if info == 0:
        T = torch.cholesky_solve(B.T.contiguous(), L).T
        solver = "cholesky"
    else:
        with single_threaded():
            evals, evecs = torch.linalg.eigh(A)
        floor = evals.max().clamp_min(1e-300) / max_condition
        warnings.warn(
            f"closed-form system is ill-conditioned (condition number {cond:.3g} > {max_condition:.3g}); "
            f"solving with eigenvalues clamped at {float(floor):.3g}. Raise 'ridge' or add preservation data.",
            RuntimeWarning,
            stacklevel=2,
        )
        inv = (evecs / evals.clamp_min(floor)) @ evecs.T
        T = B @ inv
        solver = "eigen-clamped"
    if not torch.isfinite(T).all():
        raise FloatingPointError("closed-form solve produced non-finite values; nothing was changed")
    return T, solver, cond


# --------------------------------------------------------------------------- the edit


@dataclass
class EditRows:
    """Every row entering the sums, encoded once and kept compactly."""

    table: torch.Tensor  # (n_rows, D) float32 (float64 from a float64 encoder): unique selected token embeddings
    src_index: torch.Tensor  # (N,) int64 rows of e_i (edit) and p_j (preservation) in `table`
    tgt_index: torch.Tensor  # (N,) int64 rows of e'_i; equal to src_index for preservation rows
    weight: torch.Tensor  # (N,) float32: w_i for edit rows, lam for preservation rows
    owner: torch.Tensor  # (N,) int64: index of the concept a row edits, -1 for preservation
    n_edit: int  # the first n_edit rows are edit rows
    preserve_weight: float  # lam
    caption_gram: torch.Tensor | None  # (D, D) sum of caption rows' outer products, unweighted
    caption_rows: int
    preserved: dict = dataclasses.field(default_factory=dict)  # what was preserved, for the manifest
    prior_gram: torch.Tensor | None = None  # prior="generic": its rows' share of caption_gram (for prior_drift)


def target_positions(mode: str, tokenizer, template: str, anchor: str, src_pos: list[int], ids_s: list[int],
                     ids_t: list[int], eot_id: int, where: str) -> list[int]:
    """The target prompt's positions each source row maps to, for the token mode ``mode``."""
    if mode == "concept":
        tgt_lo = span_start(tokenizer, template, anchor, ids_t, where) if anchor.strip() else prefix_end(tokenizer, template)
        return aligned_targets(src_pos, ids_s.index(eot_id), ids_t.index(eot_id), tgt_lo)
    if mode == "last":
        return [ids_t.index(eot_id) - 1]
    if mode == "eot":
        return [ids_t.index(eot_id)]
    return src_pos


def _pair_ids(tokenizer, concept) -> list[list[int]]:
    """Token ids of a concept's source prompts, then of its target prompts (template order)."""
    pairs = concept.prompt_pairs()
    return _tokenize(tokenizer, [s for _, s, _ in pairs] + [t for _, _, t in pairs])


def _edit_rows(plan: RowPlan, tokenizer, concepts: ConceptSet, config: ClosedFormConfig, shared: set,
               pair_ids: list[list[list[int]]]):
    """(source rows, target rows, weights, owners, rows skipped per concept) of every concept's
    prompt pairs (``pair_ids``: ``_pair_ids`` of each); a row whose token prefix is in ``shared``
    (a preserved prompt's) is skipped."""
    eot_id = tokenizer.eos_token_id
    src_rows, tgt_rows, weights, owner, skipped = [], [], [], [], {}
    for ci, (concept, ids_all) in enumerate(zip(concepts.concepts, pair_ids)):
        pairs = concept.prompt_pairs()
        kept = 0
        for k, (template, src, tgt) in enumerate(pairs):
            ids_s, ids_t = ids_all[k], ids_all[len(pairs) + k]
            where = f"concept {concept.name!r}, template {template!r}"
            mode = concept.tokens or config.tokens
            src_pos = token_positions(mode, tokenizer, template, concept.name, ids_s, eot_id, where)
            tgt_pos = target_positions(mode, tokenizer, template, concept.anchor, src_pos, ids_s, ids_t, eot_id, where)
            ps, pt = plan.prompt(src), plan.prompt(tgt)
            for a, b in zip(src_pos, tgt_pos):
                if tuple(ids_s[: a + 1]) in shared:
                    skipped[concept.name] = skipped.get(concept.name, 0) + 1
                    continue
                src_rows.append(plan.row(ps, a))
                tgt_rows.append(plan.row(pt, b))
                weights.append(config.erase_weight * concept.weight)
                owner.append(ci)
                kept += 1
        if kept == 0:
            raise ValueError(f"{concepts.source}: every token row of concept {concept.name!r} is also a row of a "
                             "preserved prompt (the same words in the same place), so nothing would erase it; "
                             "remove the preserved prompt that starts like it, or set skip_shared_rows=false")
    return src_rows, tgt_rows, weights, owner, skipped


def _preserved_prompts(pipe, concepts: ConceptSet, config: ClosedFormConfig):
    """What the edit preserves: (preserved concepts' prompts [(text, ids, positions)], captions
    whose rows run from the start token to [EoT] (the file's, then the model's frequent words),
    the prior's captions whose every row counts, the summary for the manifest)."""
    tokenizer = pipe.tokenizer
    eot_id = tokenizer.eos_token_id
    neighbours = prior.name_neighbours(pipe, concepts, config.neighbours) if config.neighbours else {}
    file_kept = len(concepts.preserve_concepts)
    kept_concepts = list(concepts.preserve_concepts) + prior.neighbour_concepts(neighbours, concepts)
    prompts = []
    for i, concept in enumerate(kept_concepts):
        for template in concept.templates:
            text = template.format(concept.name)
            try:
                (ids,) = _tokenize(tokenizer, [text])
            except PromptTooLongError:
                if i < file_kept:
                    raise
                continue  # a neighbour is optional: one whose prompt is too long is left out
            where = f"preserved concept {concept.name!r}, template {template!r}"
            prompts.append((text, ids, token_positions(config.tokens, tokenizer, template, concept.name, ids, eot_id, where)))
    captions = list(concepts.preserve_captions)
    summary = {"concepts": len(concepts.preserve_concepts), "captions": len(captions), "prior": config.prior}
    generic, vocabulary = [], []
    if config.prior == "generic":
        # Every position, padding included: cross-attention reads all 77 rows of a prompt.
        generic, left_out = prior.naming_erased(("", *prior.generic_captions()), concepts)
        vocabulary = prior.vocabulary_words(pipe, concepts, prior.VOCABULARY_WORDS)
        summary.update(generic_captions=len(generic) - 1, generic_left_out=left_out, empty_prompt=True,
                       vocabulary_words=len(vocabulary))
    if config.neighbours:
        summary["neighbours"] = neighbours
    return prompts, captions + vocabulary, generic, summary


def collect_rows(pipe, concepts: ConceptSet, config: ClosedFormConfig) -> EditRows:
    """Select the token rows of every concept and preservation prompt and encode them."""
    tokenizer = pipe.tokenizer
    eot_id = tokenizer.eos_token_id
    plan = RowPlan()
    # The concepts' own prompts first: a prompt too long is reported with its entry, not a neighbour's.
    pair_ids = [_pair_ids(tokenizer, concept) for concept in concepts.concepts]
    prompts, captions, generic, preserved = _preserved_prompts(pipe, concepts, config)
    shared = set()
    if config.skip_shared_rows:
        # Every position of a preserved prompt through its end-of-text is a row the model reads for
        # it, whether or not that row enters the preservation sums.
        kept_ids = [ids for _, ids, _ in prompts] + _tokenize(tokenizer, captions + generic)
        shared = prior.shared_prefixes([(ids, range(ids.index(eot_id) + 1)) for ids in kept_ids])
    src_rows, tgt_rows, weights, owner, skipped = _edit_rows(plan, tokenizer, concepts, config, shared, pair_ids)
    n_edit = len(src_rows)
    if n_edit == 0:
        raise ValueError(f"{concepts.source}: no concepts to edit")
    if config.skip_shared_rows:
        preserved["skipped_shared_rows"] = skipped
    # Preservation rows of retained concepts and the prior: their positions, mapped onto themselves.
    for text, _, positions in prompts:
        p = plan.prompt(text)
        for a in positions:
            r = plan.row(p, a)
            src_rows.append(r)
            tgt_rows.append(r)
            owner.append(-1)
    lam = config.preserve_weight
    if lam == AUTO:
        lam = 1.0  # replaced by choose_preserve_weight once the rows are encoded
    elif lam is None:
        n_prompts = len(prompts) + len(captions) + len(generic)
        lam = max(0.1, 1.0 / n_prompts) if n_prompts else 0.0
    weights += [lam] * (len(src_rows) - n_edit)
    table = plan.encode(pipe, config.batch_size, config.progress, "encode prompts")
    P_cap, caption_rows, P_prior = None, 0, None
    for texts, padding in ((captions, False), (generic, True)):
        if texts:
            gram, n = caption_gram(pipe, texts, config, padding=padding)
            P_cap, caption_rows = (gram if P_cap is None else P_cap + gram), caption_rows + n
            P_prior = gram if padding else P_prior
    if len(src_rows) == n_edit and P_cap is None:
        warnings.warn("the edit preserves nothing (no preserve: concepts or captions, prior=none): it will also move "
                      "prompts it does not name; list what to keep, or use a preset with the generic prior "
                      "(e.g. uce-plus)", UserWarning, stacklevel=3)
    dev = table.device  # where the text encoder ran: the fused kernels run there too
    return EditRows(
        table=table,
        src_index=torch.tensor(src_rows, dtype=torch.int64, device=dev),
        tgt_index=torch.tensor(tgt_rows, dtype=torch.int64, device=dev),
        weight=torch.tensor(weights, dtype=torch.float32, device=dev),
        owner=torch.tensor(owner, dtype=torch.int64),
        n_edit=n_edit,
        preserve_weight=lam,
        caption_gram=P_cap,
        caption_rows=caption_rows,
        preserved=preserved,
        prior_gram=P_prior,
    )


def accumulate(rows: EditRows, backend: str = "auto", gram_dtype: str = "float64") -> tuple[torch.Tensor, torch.Tensor]:
    """S = sum w e e^T + lam P and C = sum w e' e^T + lam P, in one fused gather-and-accumulate."""
    S, C = weighted_gram(
        rows.table, rows.table, rows.weight, rows.src_index, rows.tgt_index,
        out_dtype=GRAM_DTYPES[gram_dtype], backend=backend,
    )
    if rows.caption_gram is not None and rows.preserve_weight > 0:
        P = rows.caption_gram.to(S.device, S.dtype)
        S = S + rows.preserve_weight * P
        C = C + rows.preserve_weight * P
    return S, C


def apply_transform(kv: list[tuple[str, torch.nn.Linear]], T: torch.Tensor, backend: str = "auto") -> dict[str, torch.Tensor]:
    """W_l <- W_l T for every K/V matrix (one stacked kernel on GPU). Returns key -> new weight.

    Nothing is written unless every edited value is finite.
    """
    weights = [m.weight.detach() for _, m in kv]
    if weights[0].dtype == torch.float64:  # an exact model (reference runs): the kernels take fp32/16/bf16
        edited = [w @ T.to(w.device) for w in weights]
    else:  # the kernels multiply by an fp32 transform: round it once, not once per matrix
        edited = transform_each(weights, T.to(weights[0].device, torch.float32), backend=backend)
    return write_weights(kv, {key: e for (key, _), e in zip(kv, edited)}, "edited weights")


def write_weights(layers: list[tuple[str, torch.nn.Linear]], new: dict, what: str) -> dict[str, torch.Tensor]:
    """Copy ``new[key]`` into each layer's weight, in the model's dtype and device, only once every
    one is finite (else FloatingPointError naming ``what``: the model is left unchanged). Returns
    the written weights. One reduction per matrix instead of a boolean mask: any NaN/inf makes the
    sum non-finite, and finite weights cannot sum past fp32's range."""
    cast = {key: new[key].to(m.weight.device, m.weight.dtype) for key, m in layers}
    if not all(torch.isfinite(w.float().sum()) for w in cast.values()):
        raise FloatingPointError(f"{what} contain NaN or inf; the model was not changed")
    with torch.no_grad():
        for key, module in layers:
            module.weight.copy_(cast[key])
    return cast


def concept_norms(rows: EditRows, Re: torch.Tensor, moved: torch.Tensor):
    """Per concept, sums over its edit rows and every layer of ||W (T e - e')||^2 (after),
    ||W (e - e')||^2 (before) and ||W e'||^2 (reference), on the CPU. Re: R e for every encoded row;
    moved: R (T - I) e for the edit rows' sources (R from ``gram_root``)."""
    dev = rows.table.device
    src, tgt = rows.src_index[: rows.n_edit], rows.tgt_index[: rows.n_edit]
    owner = rows.owner[: rows.n_edit].to(dev)
    n = int(owner.max()) + 1  # every concept keeps at least one row

    def per_concept(x):  # (n_edit, D) -> (n,) sums of squared norms
        return torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, owner, x.square().sum(1)).cpu()

    before = Re[src] - Re[tgt]
    return per_concept(before + moved), per_concept(before), per_concept(Re[tgt])


def edit_residuals(rows: EditRows, T: torch.Tensor, Re: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Per concept, ||W (T e - e')|| / ||W (e - e')|| over its rows and every layer: the share of the
    way from the concept to its anchor that the edit leaves (0: all the way, 1: unmoved)."""
    M = T.double().cpu() - torch.eye(T.shape[0], dtype=torch.float64)
    moved = rows.table.double()[rows.src_index[: rows.n_edit]] @ (R @ M).T.to(rows.table.device)
    after, before, _ = concept_norms(rows, Re, moved)
    return (after / before.clamp_min(1e-300)).sqrt()


def balanced_edit_sums(rows: EditRows, lam: float, P: torch.Tensor, Re: torch.Tensor, R: torch.Tensor,
                       config: ClosedFormConfig):
    """``balance_concepts``: (S_edit, C_edit, worst residual, iterations, concept weights) at
    preservation weight ``lam``, each concept's edit weight multiplied by (r_i / AUTO_RESIDUAL)^2
    while its residual r_i is above the rule (at most BALANCE_ITERATIONS solves): a lagrangian
    for "every concept to the rule, the preserved prompts as still as that allows"."""
    n = rows.n_edit
    owner = rows.owner[:n].to(rows.weight.device)
    factor = torch.ones(int(rows.owner[:n].max()) + 1, dtype=torch.float64)
    for iteration in range(1, BALANCE_ITERATIONS + 1):
        weight = rows.weight[:n] * factor.to(rows.weight.device, rows.weight.dtype)[owner]
        S_e, C_e = weighted_gram(rows.table, rows.table, weight, rows.src_index[:n], rows.tgt_index[:n],
                                 out_dtype=torch.float64, backend=config.backend)
        T, _, _ = solve_transform(S_e + lam * P, C_e + lam * P, config.ridge, config.max_condition)
        residual = edit_residuals(rows, T, Re, R)
        if float(residual.max()) <= AUTO_RESIDUAL * BALANCE_TOLERANCE:
            break
        factor = factor * (residual / AUTO_RESIDUAL).clamp_min(1.0).square()
    return S_e, C_e, float(residual.max()), iteration, factor


def edit_and_preserved_sums(rows: EditRows, backend: str):
    """(S_edit, C_edit, P) in float64: the edit rows' sums and the unweighted preserved Gram."""
    n = rows.n_edit
    S_e, C_e = weighted_gram(rows.table, rows.table, rows.weight[:n], rows.src_index[:n], rows.tgt_index[:n],
                             out_dtype=torch.float64, backend=backend)
    kept = rows.table[rows.src_index[n:]].double()  # mapped onto themselves: one Gram, no cross sum
    P = kept.T @ kept
    if rows.caption_gram is not None:
        P = P + rows.caption_gram.to(P.device, P.dtype)
    return S_e, C_e, P


def choose_preserve_weight(rows: EditRows, R: torch.Tensor, config: ClosedFormConfig):
    """The largest preservation weight on a log grid (1e-5 .. 1e3) whose edit still moves every
    concept at least ``1 - AUTO_RESIDUAL`` of the way to its anchor (``edit_residuals``): as much
    of the preserved prompts kept as erasing every concept allows. The sums are linear in the
    weight, S(lam) = S_edit + lam P, so each try is one D x D solve. More preservation leaves
    the concepts further from their anchors (the summed residual grows with lam; the worst
    concept's is taken to as well), so the grid is bisected: 2 to 7 tries of its 33 weights.
    With ``balance_concepts`` each try also raises the edit weight of the concepts left furthest
    (``balanced_edit_sums``), so the hardest concept no longer sets the weight for all.

    ``R``: ``gram_root`` of the K/V Gram. Returns (weight, search report, (S, C) at that weight in
    float64, or None when there is nothing to preserve): the sums ``accumulate`` would compute, so
    they are not built twice."""
    if len(rows.src_index) == rows.n_edit and rows.caption_gram is None:
        return 0.0, {"rule": "nothing to preserve"}, None
    S_e, C_e, P = edit_and_preserved_sums(rows, config.backend)
    Re = rows.table.double() @ R.T.to(rows.table.device)
    limit = AUTO_RESIDUAL * (BALANCE_TOLERANCE if config.balance_concepts else 1.0)
    tried, found = {}, {}

    def meets_rule(k: int) -> bool:
        lam = PRESERVE_GRID[k]
        if config.balance_concepts:
            S_k, C_k, worst, iterations, factor = balanced_edit_sums(rows, lam, P, Re, R, config)
        else:
            S_k, C_k = S_e, C_e
            T, _, _ = solve_transform(S_k + lam * P, C_k + lam * P, config.ridge, config.max_condition)
            worst = float(edit_residuals(rows, T, Re, R).max())
        tried[k] = worst
        if worst <= limit:  # the bisection only tries larger weights after a success
            found.update(k=k, sums=(S_k + lam * P, C_k + lam * P))
            if config.balance_concepts:
                found["balanced"] = {"iterations": iterations, "concepts_reweighted": int((factor > 1).sum()),
                                     "concept_weights": factor.tolist()}
        return worst <= limit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an ill-conditioned try is only a try
        lo, hi = 0, len(PRESERVE_GRID) - 1
        if meets_rule(lo) and not meets_rule(hi):
            while hi - lo > 1:  # lo meets the rule, hi does not
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if meets_rule(mid) else (lo, mid)
    met = "k" in found
    chosen = PRESERVE_GRID[found.get("k", 0)]
    if not met:
        warnings.warn(f"preserve_weight=auto: even the smallest weight ({chosen:.3g}) leaves a concept "
                      f"{tried[0]:.2f} of its way to its anchor (the rule asks <= {AUTO_RESIDUAL}); "
                      "fewer preserved prompts, or a lower ridge, let the edit reach further", stacklevel=3)
    search = {"rule": f"largest weight with every concept's residual <= {AUTO_RESIDUAL}", "met": met,
              "max_concept_residual": {f"{PRESERVE_GRID[k]:.3g}": tried[k] for k in sorted(tried)}}
    if config.balance_concepts:
        search["balanced"] = found.get("balanced", {})
    sums = found["sums"] if met else (S_e + chosen * P, C_e + chosen * P)
    return chosen, search, sums


def closed_form_edit(pipe, concepts: ConceptSet, config: ClosedFormConfig) -> ClosedFormEdit:
    """Solve the edit for every concept at once and write it into `pipe.unet` in place.

    The pipeline is only modified after the solve succeeded with finite values.
    """
    timer = PhaseTimer()
    kv = cross_attention_kv(pipe.unet)
    with timer("text_encoding"):
        rows = collect_rows(pipe, concepts, config)
    with timer("report"):
        G = kv_gram(kv)  # of the weights before the edit
        R = gram_root(G)  # every residual and drift below is a norm of R x
    search = sums = None
    if config.preserve_weight == AUTO:
        with timer("preserve_weight"):
            rows.preserve_weight, search, sums = choose_preserve_weight(rows, R, config)
        if search.get("balanced"):  # each concept's factor on its edit weight, by name
            weights = search["balanced"]["concept_weights"]
            search["balanced"]["concept_weights"] = dict(zip(concepts.names(), weights))
        rows.weight[rows.n_edit :] = rows.preserve_weight
    with timer("gram"):
        if sums is None:
            S, C = accumulate(rows, config.backend, config.gram_dtype)
        else:
            S, C = (x.to(GRAM_DTYPES[config.gram_dtype]) for x in sums)
    with timer("solve"):
        T, solver, cond = solve_transform(S, C, config.ridge, config.max_condition)
    moved_prior = None
    if config.max_prior_drift is not None:
        with timer("report"):
            moved_prior = prior_drift(pipe, concepts, config, T, G, R, rows.prior_gram)
        if moved_prior > config.max_prior_drift:
            raise EditRefusedError(
                f"{concepts.source}: erasing these {len(concepts.concepts)} concept(s) in one edit would move the "
                f"cross-attention keys/values of everyday prompts by {moved_prior:.3g} of their size (the limit, "
                f"max_prior_drift, is {config.max_prior_drift:.3g}): the edited model would no longer draw much "
                "else reliably, so nothing was written. Erase fewer concepts"
                + ("" if config.balance_concepts or config.preserve_weight != AUTO else
                   ", try balance_concepts=true (each concept moved only as far as the rule asks)")
                + ", or set max_prior_drift=null to accept the damage", moved_prior)
    with timer("weight_update"):
        changed = apply_transform(kv, T, config.backend)
    with timer("report"):
        residual, before, drift = fit_report(rows, T, G, concepts, R)
    return ClosedFormEdit(
        transform=T,
        changed=changed,
        concept_residual=residual,
        concept_residual_before=before,
        preserve_drift=drift,
        solver=solver,
        condition=cond,
        rows={"edit": rows.n_edit, "preserve": len(rows.src_index) - rows.n_edit, "caption": rows.caption_rows},
        preserve_weight=rows.preserve_weight,
        timings=timer.seconds,
        preserved=rows.preserved,
        preserve_weight_search=search,
        prior_drift=moved_prior,
    )


def prior_drift(pipe, concepts: ConceptSet, config: ClosedFormConfig, T: torch.Tensor, G: torch.Tensor,
                R: torch.Tensor, P: torch.Tensor | None = None) -> float:
    """||W (T - I) p|| / ||W p|| over every row (all 77 positions) of the generic prior's prompts
    (the empty prompt and engine/prior.py's captions, less those naming an erased concept) and
    every layer: how far the edit moves everyday prompts, whether or not it preserved them.
    ``R``: ``gram_root(G)``; ``P``: those rows' Gram where the edit already built it
    (``EditRows.prior_gram``)."""
    if P is None:
        captions, _ = prior.naming_erased(("", *prior.generic_captions()), concepts)
        P, _ = caption_gram(pipe, list(captions), config, padding=True)
    M = T.double().cpu() - torch.eye(T.shape[0], dtype=torch.float64)
    num, den = gram_drift_terms(R @ M, G, P.double().cpu())
    return math.sqrt(num / den) if den > 0 else 0.0


def gram_drift_terms(RM: torch.Tensor, G: torch.Tensor, P: torch.Tensor) -> tuple[float, float]:
    """(sum_j ||R M p_j||^2, sum_j ||R p_j||^2) of the rows whose Gram is P, without the rows:
    tr(M^T G M P) = <R M P, R M> and tr(G P) = <G, P> (G = R^T R and P symmetric)."""
    return float(((RM @ P) * RM).sum()), float((G * P).sum())


def kv_gram(kv: list[tuple[str, torch.nn.Linear]], chunk_elements: int = 1 << 25) -> torch.Tensor:
    """G = W^T W of the stacked K/V matrices, (D, D) float64 on the CPU: ||W x||^2 summed over the
    layers is x^T G x. fp32 products (a report's precision) of matrices stacked into chunks of
    about `chunk_elements`: 3x faster on a CPU than one product per matrix (their inner dimensions
    are small), without a copy of every K/V weight at once (1.4 GB on SDXL)."""
    G, chunk, size = None, [], 0
    weights = [m.weight.detach() for _, m in kv]
    for i, w in enumerate(weights):
        chunk.append(w if w.dtype in (torch.float32, torch.float64) else w.float())
        size += w.numel()
        if size >= chunk_elements or i == len(weights) - 1:
            W = torch.cat(chunk)  # (rows, D)
            g = (W.T @ W).double().cpu()
            G = g if G is None else G + g
            chunk, size = [], 0
    return G


def gram_root(G: torch.Tensor) -> torch.Tensor:
    """R with R^T R = G (D x D float64): ||W x||^2 over every layer is ||R x||^2."""
    # G is singular where the K/V matrices have fewer rows than D (tiny models): a jitter at the
    # level of G's fp32 rounding keeps it factorizable and moves each form by ~1e-6 relative.
    jitter = 1e-6 * float(G.diagonal().mean().clamp_min(1e-300))
    L, info = torch.linalg.cholesky_ex(G + jitter * torch.eye(G.shape[0], dtype=torch.float64))
    if info == 0:
        return L.T
    with single_threaded():
        evals, evecs = torch.linalg.eigh(G)
    return (evecs * evals.clamp_min(0).sqrt()).T


def fit_report(rows: EditRows, T: torch.Tensor, G: torch.Tensor, concepts: ConceptSet, R: torch.Tensor | None = None):
    """Per-concept residual after (and distance before) the edit, and the preservation drift.

    All layers together: ||W x||^2 summed over layers is x^T G x (G from `kv_gram`). With
    G = R^T R (R = L^T, G's Cholesky factor), every quadratic form is a squared norm of R x, so
    all rows go through two (rows, D) x (D, D) products at once: R e and R (T - I) e. The caption
    rows enter through their Gram: sum_j ||R M p_j||^2 = tr(M^T G M P_cap), M = T - I.
    """
    dev = rows.table.device
    R = gram_root(G) if R is None else R  # the caller's, where it has one
    M = T.double().cpu() - torch.eye(T.shape[0], dtype=torch.float64)  # T - I
    table = rows.table.double()
    Re = table @ R.T.to(dev)  # (n_rows, D): R e for every encoded row
    RM = R @ M
    RMe = table @ RM.T.to(dev)  # (n_rows, D): R (T - I) e
    src = rows.src_index
    # Edit rows: before = R (e - e'), after = R (T e - e') = before + R (T - I) e, reference = R e'.
    after, before, ref = concept_norms(rows, Re, RMe[src[: rows.n_edit]])
    ref = ref.clamp_min(1e-300)
    after_rel, before_rel = (after / ref).sqrt(), (before / ref).sqrt()
    names = [c.name for c in concepts.concepts]
    residual = dict(zip(names, after_rel.tolist()))
    before_d = dict(zip(names, before_rel.tolist()))
    # Preservation drift ||W (T - I) p|| / ||W p|| over retained-concept rows and caption rows.
    pres = src[rows.n_edit :]
    num = float(RMe[pres].square().sum()) if len(pres) else 0.0
    den = float(Re[pres].square().sum()) if len(pres) else 0.0
    if rows.caption_gram is not None:
        cap_num, cap_den = gram_drift_terms(RM, G, rows.caption_gram.double().cpu())
        num, den = num + cap_num, den + cap_den
    drift = math.sqrt(num / den) if den > 0 else 0.0
    return residual, before_d, drift
