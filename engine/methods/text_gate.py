"""text-gate: per-concept gated neurons in the text encoder's last MLP (the engine's own method,
no paper; the gate idea is GLoCE's, Lee et al., CVPR 2025, which gates low-rank updates of the
UNet's image features instead).

A linear edit of the cross-attention keys/values (``uce-plus``) moves every text row by the same
matrix, so erasing hundreds of names also moves the rows of everything near them. Here each erased
concept gets two neurons in the last layer's MLP that fire only on its own [EoT] row:

    p_i(x)  = u_i . x / s_i           u_i: the unit mean direction of the concept's [EoT] rows x
                                      (the MLP's input) over its prompts; s_i: their mean u_i . x
    g_i(x)  = (a(z) - a(z - K)) / K,  z = K (p_i(x) - lo_i) / (full_i - lo_i), a the MLP's activation
    output += sum_i g_i(x) d_i

``g_i`` is a ramp from 0 below ``lo_i`` to 1 above ``full_i``: ``lo_i`` is the largest
projection of any preserved row (every row of the generic prior, the names' neighbours and what
the concept file preserves) plus ``margin``, ``full_i`` ``ramp`` above it (no higher than the
concept's own lowest projection). Rows that no gate reaches pass unchanged, exactly. The
displacements ``d`` solve ``sum_j g_j(x_i) d_j = h(anchor) - h(concept)`` (mean over each
concept's prompts, ridge 1e-2) for the last layer's output ``h`` at the [EoT], so a gated row
leaves the encoder as the anchor prompt's [EoT] row does. The prompts are the concept's own
templates and ``CARRIERS`` (everyday phrasings), each with the name and with the anchor.

The neurons widen the MLP of every layer (``intermediate_size`` is one number for the model):
the new neurons of the other layers are zero and change nothing. The result is an ordinary
CLIPTextModel that any diffusers pipeline loads; its delta widens tensors, so it applies only as
the saved pipeline (``erasure apply`` refuses it). SD1.x/2.x (one CLIP text encoder); SDXL refused.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from engine import prior
from engine.concepts import ConceptSet
from engine.closed_form import prefix_end, span_start
from engine.finetune.config import check_choices, check_numbers, check_positive_ints
from engine.methods.base import Method, Outcome
from engine.models import PromptTooLongError, tokenize_prompts
from engine.progress import progress_bar
from engine.settings import Settings
from engine.tokenizer import MAX_LENGTH

# Phrasings the name is also placed in, so that the gate sees its [EoT] row in more than one
# context. Written for this method; none is a caption template of the toy world.
CARRIERS = ("{}", "{} in the middle of a busy street", "a drawing of {}, simple lines",
            "a close view of {} against a white wall", "{} on a sunny day", "an old film still of {}",
            "{} and a friend", "a sketch of {} reading a book")
RAMP_HEIGHT = 20.0  # K: the activation is linear to within 1e-12 beyond this (quick_gelu, gelu)
KEPT_CHUNK = 1024  # preserved prompts encoded per call (their rows are kept for two passes)
RIDGE = 1e-2  # of the displacement solve: two gates that fire together share their rows' shift


@dataclass(frozen=True)
class TextGateConfig(Settings):
    rows: str = "last+eot"  # the rows that carry gates: the name's last token and the [EoT] | eot
    margin: float = 0.05  # the gate opens this far above the highest projection of a preserved row
    ramp: float = 0.15  # and is fully open this far above that
    neighbours: int = 4  # per word position of a multi-word name: neighbour names to preserve (prior.name_neighbours)
    batch_size: int = 64  # prompts per text-encoder call
    progress: bool = True

    def __post_init__(self):
        check_numbers(self, ("margin", "ramp"), positive=("ramp",))
        check_choices(self, {"rows": ("last+eot", "eot")})
        check_positive_ints(self, ("batch_size",))
        if not isinstance(self.neighbours, int) or isinstance(self.neighbours, bool) or self.neighbours < 0:
            raise ValueError(f"config field 'neighbours' must be an integer >= 0, got {self.neighbours!r}")


def _last_mlp(text_encoder):
    return text_encoder.text_model.encoder.layers[-1].mlp if hasattr(text_encoder, "text_model") \
        else text_encoder.encoder.layers[-1].mlp


def _encode(pipe, prompts: list[str], batch_size: int, desc: str, progress: bool, outputs: bool = True):
    """(the last MLP's input rows, the last layer's output rows or None unless ``outputs``) of
    ``prompts``, (N, 77, D) float64."""
    te = pipe.text_encoder
    mlp = _last_mlp(te)
    caught = {}
    hook = mlp.register_forward_hook(lambda module, inputs, output: caught.__setitem__("x", inputs[0]))
    ids = tokenize_prompts(pipe.tokenizer, prompts)
    xs, hs = [], []
    try:
        with torch.no_grad():
            for start in progress_bar(range(0, len(prompts), batch_size), desc=desc, progress=progress):
                batch = ids[start:start + batch_size].to(te.device)
                out = te(batch, output_hidden_states=True)
                xs.append(caught["x"].double().cpu())
                if outputs:
                    hs.append(out.hidden_states[-1].double().cpu())
    finally:
        hook.remove()
    return torch.cat(xs), torch.cat(hs) if outputs else None


def _gate(act, p: torch.Tensor, lo: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """g: 0 below lo, 1 above full, through the MLP's own activation (what the neurons compute)."""
    z = RAMP_HEIGHT * (p - lo) / (full - lo)
    return (act(z) - act(z - RAMP_HEIGHT)) / RAMP_HEIGHT


def _preserved_prompts(pipe, concepts: ConceptSet, cfg: TextGateConfig) -> list[str]:
    """Every prompt whose rows the gates must leave closed: the generic prior, the names'
    neighbours and the concept file's preserved concepts and captions."""
    listed = [t.format(c.name) for c in concepts.preserve_concepts for t in c.templates] + list(concepts.preserve_captions)
    if listed:  # the file's own prompts: one over 77 tokens is an error
        tokenize_prompts(pipe.tokenizer, listed)
    neighbours = prior.name_neighbours(pipe, concepts, cfg.neighbours) if cfg.neighbours else {}
    generic, _ = prior.naming_erased(("", *prior.generic_captions()), concepts)
    words = prior.vocabulary_words(pipe, concepts, prior.VOCABULARY_WORDS)
    added = [t.format(c.name) for c in prior.neighbour_concepts(neighbours, concepts) for t in c.templates]
    out = list(listed)
    for text in added + generic + words:
        try:
            tokenize_prompts(pipe.tokenizer, [text])
        except PromptTooLongError:
            continue  # a neighbour's or caption's over-long prompt is left out
        out.append(text)
    return out


def _last_token(tokenizer, template: str, fill: str, ids: list[int], where: str) -> int:
    """Position of the last token of ``fill`` inside template.format(fill)."""
    return span_start(tokenizer, template, fill, ids, where) + len(tokenizer(fill, add_special_tokens=False).input_ids) - 1


def _concept_prompts(pipe, concepts: ConceptSet, rows: str):
    """Every (concept prompt, anchor prompt, gate, row in each) of the gates: one gate per concept
    and row kind (the name's last token, the [EoT]), its prompts the concept's templates and CARRIERS."""
    tok, eot = pipe.tokenizer, pipe.tokenizer.eos_token_id
    kinds = rows.split("+")
    out = []
    for i, c in enumerate(concepts.concepts):
        for template in dict.fromkeys((*c.templates, *CARRIERS)):
            text, anchor = template.format(c.name), template.format(c.anchor)
            ids, ids_a = tokenize_prompts(tok, [text, anchor]).tolist()
            for k, kind in enumerate(kinds):
                if kind == "eot":
                    pos, pos_a = ids.index(eot), ids_a.index(eot)
                else:
                    where = f"concept {c.name!r}, template {template!r}"
                    pos = _last_token(tok, template, c.name, ids, where)
                    # anchor "": the row before where the name stood (the start token for "{}")
                    pos_a = _last_token(tok, template, c.anchor, ids_a, where) if c.anchor.strip() \
                        else prefix_end(tok, template) - 1
                out.append((text, anchor, i * len(kinds) + k, pos, pos_a))
    return out


def build_gates(pipe, concepts: ConceptSet, cfg: TextGateConfig) -> dict:
    """The gates' keys, thresholds and displacements, and what the manifest reports."""
    act = _last_mlp(pipe.text_encoder).activation_fn
    names = [c.name for c in concepts.concepts]
    rows = _concept_prompts(pipe, concepts, cfg.rows)
    texts, anchors, gate, pos, pos_a = (list(v) for v in zip(*rows))
    gate, at = torch.tensor(gate), torch.arange(len(rows))
    x, h = _encode(pipe, list(dict.fromkeys(texts)), cfg.batch_size, "text-gate: concept prompts", cfg.progress)
    row_of = {t: j for j, t in enumerate(dict.fromkeys(texts))}
    pick = torch.tensor([row_of[t] for t in texts])
    x, h = x[pick, pos], h[pick, pos]
    _, h_a = _encode(pipe, list(dict.fromkeys(anchors)), cfg.batch_size, "text-gate: anchor prompts", cfg.progress)
    row_of = {t: j for j, t in enumerate(dict.fromkeys(anchors))}
    h_a = h_a[torch.tensor([row_of[t] for t in anchors]), pos_a]
    # Projections are taken from the preserved rows' mean: the rows of a CLIP encoder share a large
    # common part, which would otherwise make every row look alike.
    kept = _preserved_prompts(pipe, concepts, cfg)
    kept_x = [_encode(pipe, kept[s:s + KEPT_CHUNK], cfg.batch_size, "text-gate: preserved prompts", cfg.progress,
                      outputs=False)[0].reshape(-1, x.shape[1])
              for s in range(0, len(kept), KEPT_CHUNK)]  # every row: cross-attention reads all 77
    center = torch.cat(kept_x).mean(0)
    n = int(gate.max()) + 1
    per = torch.zeros(n, dtype=torch.float64).index_add_(0, gate, torch.ones(len(gate), dtype=torch.float64))
    keys = torch.nn.functional.normalize(
        torch.zeros(n, x.shape[1], dtype=torch.float64).index_add_(0, gate, torch.nn.functional.normalize(x - center, dim=1)),
        dim=1)
    own_proj = ((x - center) * keys[gate]).sum(1)
    scale = torch.zeros(n, dtype=torch.float64).index_add_(0, gate, own_proj) / per
    own = own_proj / scale[gate]
    own_min = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce_(0, gate, own, "amin")
    # A preserved row within ``margin`` of a concept's own prompts (e.g. a neighbour that is a
    # fragment of the name: "Aldric rance" for "Aldric Corrance") cannot be kept apart from it: it
    # is left out of the threshold (so lo < own_min always) and listed in the manifest.
    kept_max = torch.full((n,), -float("inf"), dtype=torch.float64)
    too_close = []
    for chunk, xk in enumerate(kept_x):
        proj = (((xk - center) @ keys.T) / scale).reshape(-1, MAX_LENGTH, n)  # (prompts, 77, gates)
        close = proj >= own_min - cfg.margin
        kept_max = torch.maximum(kept_max, proj.masked_fill(close, -float("inf")).amax((0, 1)))
        too_close += [kept[chunk * KEPT_CHUNK + i] for i in torch.nonzero(close.any(2).any(1)).flatten().tolist()]
    lo = kept_max + cfg.margin
    full = torch.maximum(lo + cfg.ramp / 3, torch.minimum(own_min, lo + cfg.ramp))  # a ramp of ramp/3 at least
    opened = _gate(act, ((x - center) @ keys.T) / scale, lo, full)  # (rows, gates)
    G = torch.zeros(n, n, dtype=torch.float64).index_add_(0, gate, opened) / per[:, None]
    target = torch.zeros_like(keys).index_add_(0, gate, h_a - h) / per[:, None]
    shifts = torch.linalg.solve(G.T @ G + RIDGE * torch.eye(n, dtype=torch.float64), G.T @ target)
    if too_close:
        warnings.warn(f"text-gate: {len(too_close)} preserved prompt(s) are within the margin of an erased concept's own "
                      f"prompts (e.g. {too_close[0]!r}) and will be erased with it (the manifest lists them)",
                      RuntimeWarning, stacklevel=3)
    report = {"concepts": len(names), "rows": cfg.rows, "gates": n, "neurons": 2 * n,
              "prompts_per_concept": int(per.max()), "preserved_prompts": len(kept),
              "preserved_but_gated": too_close[:100], "preserved_but_gated_count": len(too_close),
              "gate_open_on_own_prompts": float(opened[at, gate].mean()),
              "preserved_max_projection": {"median": float(kept_max.median()), "max": float(kept_max.max())}}
    return {"keys": keys, "center": center, "scale": scale, "lo": lo, "full": full, "shifts": shifts, "report": report}


def widened_text_encoder(text_encoder, gates: dict):
    """A copy of ``text_encoder`` with two neurons per gate appended to every layer's MLP: the last
    layer's compute the gates, the others are zero (their activation of 0 adds nothing)."""
    config = text_encoder.config.__class__.from_dict(text_encoder.config.to_dict())
    extra = 2 * len(gates["keys"])
    config.intermediate_size = text_encoder.config.intermediate_size + extra
    wide = type(text_encoder)(config).to(device=text_encoder.device, dtype=text_encoder.dtype).eval()
    state = text_encoder.state_dict()
    last = _last_mlp(text_encoder)
    last_prefix = next(k for k, v in text_encoder.named_modules() if v is last) + "."
    slope = RAMP_HEIGHT / (gates["full"] - gates["lo"])  # (n,)
    w_in = (slope / gates["scale"])[:, None] * gates["keys"]  # z = w_in . x + b_in
    b_in = -slope * gates["lo"] - w_in @ gates["center"]
    rows_in = torch.cat([w_in, w_in])  # neuron pairs: a(z) and a(z - K)
    bias_in = torch.cat([b_in, b_in - RAMP_HEIGHT])
    cols_out = torch.cat([gates["shifts"], -gates["shifts"]]).T / RAMP_HEIGHT  # (D, 2n)
    new = {}
    for key, value in wide.state_dict().items():
        old = state[key]
        if old.shape == value.shape:
            new[key] = old
            continue
        grown = torch.zeros_like(value)
        grown[tuple(slice(0, s) for s in old.shape)] = old
        if key.startswith(last_prefix):
            part = key[len(last_prefix):]
            fill = {"fc1.weight": rows_in, "fc1.bias": bias_in, "fc2.weight": cols_out}[part]
            index = (slice(old.shape[0], None),) if part.startswith("fc1") else (slice(None), slice(old.shape[1], None))
            grown[index] = fill.to(grown.dtype)
        new[key] = grown
    wide.load_state_dict(new)
    return wide


@dataclass(frozen=True)
class TextGateMethod(Method):
    """Gated neurons in the text encoder (module docstring)."""

    def component(self, cfg) -> str:
        return "text_encoder"

    def touched(self, text_encoder, cfg) -> set[str]:
        return {k for k, _ in text_encoder.named_parameters() if ".mlp.fc1." in k or k.endswith(".mlp.fc2.weight")}

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        self.check_settings(cfg)
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError("text-gate edits one CLIP text encoder (SD1.x/2.x); this pipeline has two (SDXL)")
        start = time.perf_counter()
        gates = build_gates(pipe, concepts, cfg)
        build_s = time.perf_counter() - start
        wide = widened_text_encoder(pipe.text_encoder, gates)
        changed = {k: v for k, v in wide.state_dict().items() if k in self.touched(pipe.text_encoder, cfg)}
        pipe.text_encoder = wide
        if hasattr(pipe, "register_modules"):
            pipe.register_modules(text_encoder=wide)  # so save_pretrained writes the widened one
        report = gates["report"]
        return Outcome(changed=changed, timings={"gates": build_s, "widen": time.perf_counter() - start - build_s},
                       manifest={"seed": None, "gates": report})


TEXT_GATE = TextGateMethod(
    name="text-gate",
    defaults=TextGateConfig(),
    summary="per-concept gated neurons in the text encoder's last MLP: each erased name's [EoT] row "
            "leaves the encoder as the anchor's, every other row unchanged (the engine's own method)",
    fingerprint_key="mlp_fingerprint",
)
