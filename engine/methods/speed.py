"""SPEED: Scalable, Precise and Efficient concept Erasure for Diffusion models (Li et al., ICLR 2026,
arXiv 2503.07392), from the official code (github.com/Ouxiang-Li/SPEED @6d3df0c, train_erase_null.py,
whose lines l.N cites). For each edited cross-attention projection W (attn2.to_v: params "V"):

    C_tt = mean c_t c_t^T,  C_at = mean c_a c_t^T;  dW_0 = W (C_at - C_tt)(I + C_tt)^-1  (l.55-69, l.90)
    IPF: R_f = {c in R : ||dW_0 c|| > its mean over R}           (l.94-98; only with aug_num > 0)
    DPA: aug_num samples c + z v_min of each row (z ~ N(0, 1), v_min: W's right singular vector of
         the smallest singular value), per chunk of 128 rows of R_f, kept where ||dW_0 c'|| is
         above its mean over the chunk's samples                                  (l.19-31, l.101-106)
    C_0 = mean c c^T over R_f and the kept samples;  P = projector onto C_0's eigenvectors of
         eigenvalue < threshold                                                   (l.107-113)
    K2  = [the [SOT] row of "", k-means centres of its rows 1..76]                (l.45-50)
    M   = (C_tt P + retain_scale I)^-1
    dW  = W (C_at - C_tt) P [I - M K2 (K2^T P M K2 + lamb I)^-1 K2^T P] M;  W' = W + dW  (l.114-118)

c_t: each concept prompt's last token before [EoT]; c_a: its anchor prompt's (the [SOT] row for
anchor ""); R: retained prompts' last tokens. Each layer is solved on its own, as in the paper
(dW_0 and v_min depend on W, so P differs per layer).

Deviations from the official code:
* Prompts: each template of a concept is a target prompt (the paper: the bare name, the default
  template "{}"), its anchor row from the template filled with the anchor; concept weights are the
  prompts' relative weights in the means (all 1: the plain mean). ``tokens: all`` takes rows
  1..76 of prompt and anchor (the nudity rule, l.61-63); other token modes are refused.
* Retain set: the file's preserved concepts (each template) and captions, a last-token row each,
  less those naming an erased concept as a whole word (l.74). With none, the generic prior
  (engine/prior.py generic_captions(), every token through [EoT]) replaces the paper's fallback
  (rows 1..76 of "", for nudity; IEC keeps their centres anyway); the manifest says which.
* Randomness: a CPU torch.Generator seeded with ``seed`` draws the retain shuffle (l.85), then per
  layer and chunk the DPA scalars z = randn(aug_num, rows) (v_min's largest entry made positive):
  v_min^T eps ~ N(0, 1) is all of the official eps ~ N(0, I) that survives eps @ P_min. K-means:
  Lloyd's, as kmeans_pytorch 0.3 (k distinct random rows; stop when the squared total centre
  shift < 1e-4; at most 300 rounds; an empty cluster keeps its centre), its own generator seeded
  with ``seed``. Results match the official CUDA/numpy streams in distribution, not bit for bit.
* Numerics: float64 on the CPU (official: float32, GPU); eigh of the symmetric C_0 for svd (the
  same eigenpairs). With lamb = 0 and K2^T P M K2 singular (an invariant in the retained span), a
  pseudo-inverse replaces .inverse() (inf there; equal when invertible); dW K2 = 0 either way.
  No weight is written unless every new weight is finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import prior
from engine.closed_form import PhaseTimer, RowPlan, cross_attention_kv, single_threaded, write_weights
from engine.concepts import ConceptSet
from engine.finetune.config import check_choices, check_numbers, check_positive_ints
from engine.methods.base import Method, Outcome
from engine.models import tokenize_prompts
from engine.progress import progress_bar
from engine.settings import Settings
from engine.tokenizer import MAX_LENGTH

PARAMS = {"V": ("to_v",), "K": ("to_k",), "KV": ("to_k", "to_v")}  # l.38-43
CHUNK = 128  # rows of R_f per DPA chunk (l.35, hard-coded there)
KMEANS_TOL, KMEANS_ROUNDS = 1e-4, 300
IEC_ROWS = MAX_LENGTH - 1  # rows 1..76 of the empty prompt
PINV_RTOL = 1e-10  # K2^T P M K2's eigenvalues below this share of the largest count as zero


@dataclass(frozen=True)
class SpeedConfig(Settings):
    """SPEED's settings, the official argparse defaults (l.128-144). Validated on construction."""

    params: str = "V"  # which projections: V (to_v, the paper's) | K | KV
    threshold: float = 0.1  # tau: C_0's eigenvalues below it span the null space
    retain_scale: float = 1.0  # alpha, the ridge of M
    lamb: float = 0.0  # lambda, the ridge of the IEC solve (0: the invariants exactly kept)
    aug_num: int = 10  # DPA samples per retained row (0: neither DPA nor IPF)
    filter: bool = True  # IPF (the official --disable_filter is filter=False)
    iec_clusters: int = 3  # k-means centres of the empty prompt's rows 1..76 in K2
    seed: int = 0
    batch_size: int = 64  # prompts per text-encoder call
    progress: bool = True

    def __post_init__(self):
        check_choices(self, {"params": tuple(PARAMS)})
        check_numbers(self, ("threshold", "retain_scale", "lamb"), positive=("threshold", "retain_scale"))
        check_positive_ints(self, ("batch_size",))
        for name, high in (("aug_num", None), ("seed", None), ("iec_clusters", IEC_ROWS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= (high or value):
                raise ValueError(f"config field {name!r} must be an integer >= 0{f' and <= {high}' if high else ''}, "
                                 f"got {value!r}")
        for name in ("filter", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config field {name!r} must be true or false, got {getattr(self, name)!r}")



def target_stats(targets, anchors, prompt, weight):
    """(C_tt, C_at): per target prompt the sum over its rows, then the weighted mean over prompts."""
    w = (weight / weight.sum())[prompt]
    return (targets * w[:, None]).T @ targets, (anchors * w[:, None]).T @ targets


def kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(k, D) centres of Lloyd's k-means of the rows of x, seeded (module docstring)."""
    centres = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(KMEANS_ROUNDS):
        label = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
        shift, centres = float((new - centres).norm(dim=1).sum()) ** 2, new
        if shift < KMEANS_TOL:
            break
    return centres


def iec_invariants(empty: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K2 (D, 1 + k): the empty prompt's [SOT] row and the k-means centres of its rows 1..76."""
    return torch.cat([empty[:1]] + ([kmeans(empty[1:], k, seed)] if k else [])).T


def refine_retain(W, erase, retain, cfg: SpeedConfig, gen: torch.Generator):
    """C_0 of the refined retain set (IPF, then DPA) for the layer W, and the rows it used."""
    score = lambda x: (x @ erase.T).norm(dim=1)  # noqa: E731
    kept = retain[(s := score(retain)) > s.mean()] if cfg.aug_num > 0 and cfg.filter and len(retain) else retain
    v = torch.linalg.svd(W, full_matrices=False).Vh[-1]  # the smallest singular value's (l.91-92)
    v = v * v[v.abs().argmax()].sign()  # a fixed sign: its largest entry positive
    C0, total, augmented = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64), 0, 0
    for lo in range(0, len(kept), CHUNK):
        chunk = kept[lo : lo + CHUNK]
        if cfg.aug_num > 0:
            z = torch.randn(cfg.aug_num, len(chunk), generator=gen, dtype=torch.float64)
            samples = (chunk[None] + z[..., None] * v).reshape(-1, W.shape[1])
            samples = samples[(s := score(samples)) > s.mean()]
            augmented += len(samples)
            chunk = torch.cat([chunk, samples])
        C0, total = C0 + chunk.T @ chunk, total + len(chunk)
    return C0 / max(total, 1), {"retain_after_ipf": len(kept), "augmented": augmented}


def layer_edit(W, C_tt, C_at, retain, K2, cfg: SpeedConfig, gen: torch.Generator):
    """dW (float64) of one layer W (float64, d_out x D) and the statistics of its solve."""
    eye, eye_k = torch.eye(W.shape[1], dtype=torch.float64), torch.eye(K2.shape[1], dtype=torch.float64)
    erase = torch.linalg.solve(eye + C_tt, W @ (C_at - C_tt), left=False)  # dW_0 (l.90)
    C0, stats = refine_retain(W, erase, retain, cfg, gen)
    with single_threaded():
        evals, evecs = torch.linalg.eigh(0.5 * (C0 + C0.T))
        U = evecs[:, evals < cfg.threshold]  # the null space of the refined priors (l.112-113)
        P = U @ U.T
        M = torch.linalg.inv(C_tt @ P + cfg.retain_scale * eye)
        G = K2.T @ P @ M @ K2  # P M = P (P C_tt P + alpha I)^-1 P is symmetric, so G is, up to rounding
        evals, evecs = torch.linalg.eigh(0.5 * (G + G.T) + cfg.lamb * eye_k)
    keep = evals > PINV_RTOL * evals.abs().max().clamp_min(1e-300)
    G_inv = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T  # the inverse when G is invertible
    delta = W @ (C_at - C_tt) @ P @ (eye - M @ K2 @ G_inv @ K2.T @ P) @ M  # l.114-115
    return delta, {**stats, "null_space_dim": U.shape[1], "iec_rank": int(keep.sum())}


def edited_layers(unet, params: str) -> list[tuple[str, torch.nn.Linear]]:
    """(state-dict key, module) of the cross-attention projections ``params`` names, in model order."""
    return [(k, m) for k, m in cross_attention_kv(unet) if k.rsplit(".", 2)[-2] in PARAMS[params]]


def encode_rows(pipe, requests: list[tuple[str, list[int]]], cfg: SpeedConfig, desc: str) -> torch.Tensor:
    """The rows asked for, [(prompt, positions)] -> (total positions, D) float64 on the CPU, in order
    (each distinct prompt encoded once)."""
    plan = RowPlan()
    index = [plan.row(plan.prompt(text), p) for text, positions in requests for p in positions]
    if not index:
        return torch.empty(0, pipe.unet.config.cross_attention_dim, dtype=torch.float64)
    table = plan.encode(pipe, cfg.batch_size, cfg.progress, desc)
    return table[torch.tensor(index, device=table.device)].double().cpu()


def target_requests(pipe, concepts: ConceptSet):
    """Target and anchor requests, each row's target prompt, each target prompt's concept. The last token
    before [EoT] is the official attention_mask.sum() - 2 (l.65-66)."""
    eot, src, tgt, prompt, owner = pipe.tokenizer.eos_token_id, [], [], [], []
    for ci, concept in enumerate(concepts.concepts):
        mode = concept.tokens or "last"
        if mode not in ("last", "all"):
            raise ValueError(f"{concepts.source}: concept {concept.name!r}: field 'tokens': speed edits the last "
                             f"token before [EoT] ('last') or rows 1..76 ('all', the nudity rows), got {mode!r}")
        pairs = concept.prompt_pairs()
        ids = tokenize_prompts(pipe.tokenizer, [s for _, s, _ in pairs] + [t for _, _, t in pairs]).tolist()
        for k, (_, s, t) in enumerate(pairs):
            ps, pt = ((list(range(1, MAX_LENGTH)),) * 2 if mode == "all"
                      else ([ids[k].index(eot) - 1], [ids[len(pairs) + k].index(eot) - 1]))
            src.append((s, ps))
            tgt.append((t, pt))
            prompt.extend([len(owner)] * len(ps))
            owner.append(ci)
    return src, tgt, torch.tensor(prompt, dtype=torch.int64), owner


def retain_requests(pipe, concepts: ConceptSet) -> tuple[list, dict]:
    """R's requests (module docstring: the file's preserved prompts, else the generic prior) and a summary."""
    eot = pipe.tokenizer.eos_token_id
    names, dropped = prior.naming_erased([c.name for c in concepts.preserve_concepts], concepts)
    captions, dropped_captions = prior.naming_erased(concepts.preserve_captions, concepts)
    texts = [t.format(c.name) for c in concepts.preserve_concepts if c.name in names for t in c.templates]
    texts = list(dict.fromkeys(texts + captions))
    if texts:
        ids = tokenize_prompts(pipe.tokenizer, texts).tolist()
        return [(t, [i.index(eot) - 1]) for t, i in zip(texts, ids)], {
            "source": "concept file: its preserved concepts and captions, the last token before [EoT] of each",
            "prompts": len(texts), "left_out_naming_erased": dropped + dropped_captions}
    texts, left_out = prior.naming_erased(prior.generic_captions(), concepts)  # the file preserves nothing
    ids = tokenize_prompts(pipe.tokenizer, texts).tolist()
    return [(t, list(range(i.index(eot) + 1))) for t, i in zip(texts, ids)], {
        "source": "generic prior (engine/prior.py generic_captions(), every token through [EoT]): the concept "
                  "file preserves nothing", "prompts": len(texts), "left_out_naming_erased": left_out}


def _report(layers, new, W_old, targets, anchors, owner, retain, K2, names) -> dict:
    """Per concept ||W' c_t - W c_a|| / ||W c_a|| after and before, over every layer; R's and K2's drift."""
    sums, drift = torch.zeros(3, len(names), dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for key, _ in layers:
        W, dW = W_old[key], new[key].double().cpu() - W_old[key]
        ref = anchors @ W.T
        for j, x in enumerate((targets @ (W + dW).T - ref, (targets - anchors) @ W.T, ref)):
            sums[j].index_add_(0, owner, x.square().sum(1))
        drift += torch.stack([(x @ w.T).square().sum() for x in (retain, K2.T) for w in (dW, W)])
    after, before = (sums[:2] / sums[2].clamp_min(1e-300)).sqrt().tolist()
    ratio = [math.sqrt(float(a / b)) if b > 0 else 0.0 for a, b in (drift[:2], drift[2:])]
    return {"concept_residual": dict(zip(names, after)), "concept_residual_before": dict(zip(names, before)),
            "preserve_drift": ratio[0], "iec_drift": ratio[1]}


def speed_edit(pipe, concepts: ConceptSet, cfg: SpeedConfig) -> Outcome:
    """Solve SPEED for every layer ``cfg.params`` names and write it into ``pipe.unet``."""
    timer = PhaseTimer()
    with timer("text_encoding"):
        src, tgt, prompt, owner = target_requests(pipe, concepts)
        requests, retained = retain_requests(pipe, concepts)
        targets, anchors = encode_rows(pipe, src, cfg, "encode targets"), encode_rows(pipe, tgt, cfg, "encode anchors")
        retain = encode_rows(pipe, requests, cfg, "encode retained prompts")
        empty = encode_rows(pipe, [("", list(range(MAX_LENGTH)))], cfg, "encode the empty prompt")  # IEC
    with timer("solve"):
        K2 = iec_invariants(empty, cfg.iec_clusters, cfg.seed)
        weight = torch.tensor([concepts.concepts[o].weight for o in owner], dtype=torch.float64)
        C_tt, C_at = target_stats(targets, anchors, prompt, weight)
        gen = torch.Generator().manual_seed(cfg.seed)
        shuffled = retain[torch.randperm(len(retain), generator=gen)]  # l.85
        layers = edited_layers(pipe.unet, cfg.params)
        W_old, new, stats = {}, {}, {}
        for key, module in progress_bar(layers, desc="SPEED: solve each layer", progress=cfg.progress, unit="layer"):
            W_old[key] = module.weight.detach().double().cpu()
            delta, stats[key] = layer_edit(W_old[key], C_tt, C_at, shuffled, K2, cfg, gen)
            new[key] = W_old[key] + delta
    with timer("weight_update"):
        changed = write_weights(layers, new, "SPEED's edited weights")
    with timer("report"):
        report = _report(layers, changed, W_old, targets, anchors, torch.tensor(owner, dtype=torch.int64)[prompt],
                         retain, K2, [c.name for c in concepts.concepts])
    span = {f: {"min": min(s[f] for s in stats.values()), "max": max(s[f] for s in stats.values())}
            for f in ("retain_after_ipf", "augmented", "null_space_dim", "iec_rank")}
    solve = {"solver": "speed: null-space projection with invariant constraints, each layer on its own",
             "layers_changed": len(changed), "threshold": cfg.threshold, "retain_scale": cfg.retain_scale,
             "lamb": cfg.lamb, "rows": {"edit": len(targets), "target_prompts": len(weight), "preserve": len(retain),
                                        "iec_invariants": K2.shape[1], **span}, "retained": retained, **report,
             "layers": stats}
    return Outcome(changed=changed, timings=timer.seconds, manifest={"seed": cfg.seed, "solve": solve}, edit=None)


@dataclass(frozen=True)
class SpeedMethod(Method):
    """SPEED's closed-form null-space edit (module docstring)."""

    def touched(self, unet, cfg) -> set[str]:
        return {key for key, _ in edited_layers(unet, cfg.params)}

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        self.check_settings(cfg)
        return speed_edit(pipe, concepts, cfg)


SPEED = SpeedMethod(
    name="speed", defaults=SpeedConfig(),
    summary="SPEED: the last concept token -> the anchor's within the null space of retained priors (IPF, DPA), "
            "[SOT] and padding kept invariant (Li et al., ICLR 2026)",
    # The paper's celebrity runs (scripts/eval_multi.sh): tau 1e-4, alpha 0.05, --disable_filter.
    presets={"celebrity": {"threshold": 1e-4, "retain_scale": 0.05, "filter": False}},
)
