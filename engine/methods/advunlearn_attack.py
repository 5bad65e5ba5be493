"""AdvUnlearn's pieces beside its objective (engine/methods/advunlearn.py): the inner attack, the
text-encoder parameter sets and the retain prompts.

``soft_prompt_attack``: the official lower level (OPTML-Group/AdvUnlearn @9d23124,
train-scripts/utils/attack_util.py l.126-222, attack_embd_type "word_embd"): k continuous token
vectors v placed in the concept prompt c (``adversarial_text``: before it, "prefix_k"; after it,
"suffix_k"; instead of it, "replace_k") are optimised so that the CURRENT model regenerates what
the original model makes of c:

    min_v  E_{x_t, t} || eps_theta(x_t, t, E_phi([v; c])) - eps*(x_t, t, E*(c)) ||^2

(E_phi the text encoder being trained, E* the original), each step on a fresh x_t of c with
Adam at ``attack_lr``; "pgd" steps along the gradient, "fast_at" along its sign (l.206-212). The
vectors start from k random vocabulary embeddings ("random", init_adv l.5-20) or from the
previous attack's vectors ("latest").

``text_encoder_parameters``: the official ``param_choices`` (train-scripts/utils/util.py l.36-413)
for the text encoder: the encoder layers chosen (all: "text_encoder_full"), their part ("all",
"ffn": the MLPs, "attn": self-attention), and the final layer norm with every layer and part or
when asked (--norm_layer). Never the token or position embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attacks.common import TokenTable, encode_with_tokens
from engine.concepts import ConceptSet
from engine.prior import generic_captions, naming_erased

ATTACK_TYPES = ("prefix_k", "suffix_k", "replace_k")
TEXT_ENCODER_PARTS = ("all", "ffn", "attn")


def adversarial_text(prompt: str, phrase: str, attack_type: str) -> str:
    """The prompt with the adversarial placeholder tokens ``phrase`` where ``attack_type`` puts them."""
    if attack_type not in ATTACK_TYPES:
        raise ValueError(f"config field 'attack_type' must be one of {ATTACK_TYPES}, got {attack_type!r}")
    return {"prefix_k": f"{phrase} {prompt}", "suffix_k": f"{prompt} {phrase}", "replace_k": phrase}[attack_type]


class AdversarialPrompts:
    """The k placeholder tokens and each concept prompt's adversarial text (checked to fit 77 tokens)."""

    def __init__(self, pipe, prompts: list[str], k: int, attack_type: str):
        embedding = pipe.text_encoder.get_input_embeddings().weight
        self.table = TokenTable(pipe, torch.zeros(k, embedding.shape[1], dtype=embedding.dtype))
        self.texts = [adversarial_text(p, self.table.phrase, attack_type) for p in prompts]
        limit = self.table.tokenizer.model_max_length
        for prompt, text in zip(prompts, self.texts):
            if len(self.table.tokenizer(text).input_ids) > limit:
                raise ValueError(f"the prompt {prompt!r} with {k} adversarial token(s) is over {limit} tokens; "
                                 "shorten it or lower adv_tokens")

    def encode(self, pipe, item: int, vectors: torch.Tensor) -> torch.Tensor:
        """(1, 77, D) hidden states of concept prompt ``item`` with ``vectors`` at the placeholders
        (differentiable in ``vectors`` and in the text encoder's parameters)."""
        self.table.vectors = vectors
        return encode_with_tokens(pipe, [self.texts[item]], self.table)


def soft_prompt_attack(pipe, unet, adversarial: AdversarialPrompts, item: int, draw, cfg, gen,
                       init: torch.Tensor | None) -> tuple[torch.Tensor, list[float]]:
    """The official attack on concept prompt ``item`` (module docstring) against ``unet`` and the
    pipeline's text encoder as they are now. ``draw(item, n, gen)`` gives (x_t, t, frozen
    [eps*(x_t,t,""), eps*(x_t,t,c)]) of the prompt; ``init``: the starting vectors (None: k random
    vocabulary embeddings). Returns the vectors (k, D) and the loss of each step."""
    embedding = pipe.text_encoder.get_input_embeddings().weight.detach()
    if init is None:
        init = embedding[torch.randint(0, embedding.shape[0], (cfg.adv_tokens,), generator=gen)]
    vectors = init.detach().clone().to(embedding.device, embedding.dtype).requires_grad_(True)
    opt = torch.optim.Adam([vectors], lr=cfg.attack_lr)
    modes = [(m, m.training) for m in (unet, pipe.text_encoder)]
    for module, _ in modes:
        module.eval()
    losses = []
    try:
        for _ in range(cfg.attack_steps):
            x, t, frozen = draw(item, 1, gen)
            pred = unet(x, t, adversarial.encode(pipe, item, vectors).to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), frozen[:, 1].float())
            (grad,) = torch.autograd.grad(loss, [vectors])  # only the vectors: no model gradient is left behind
            vectors.grad = grad.sign() if cfg.attack_method == "fast_at" else grad
            opt.step()
            losses.append(loss.item())
    finally:
        for module, training in modes:
            module.train(training)
    return vectors.detach(), losses


def layer_indices(value, count: int | None = None) -> list[int] | None:
    """The encoder layers of ``text_encoder_layers``: None for "all", else the sorted indices of an
    integer or a comma-separated list ("0,1,2"); checked against ``count`` layers when given."""
    if value == "all":
        return None if count is None else list(range(count))
    try:
        parts = [value] if isinstance(value, int) and not isinstance(value, bool) else str(value).split(",")
        chosen = sorted({int(p) for p in parts})
    except (TypeError, ValueError):
        chosen = None
    if not chosen or any(i < 0 for i in chosen):
        raise ValueError(f"config field 'text_encoder_layers' must be 'all' or encoder layer indices such as '0' or "
                         f"'0,1,2', got {value!r}")
    if count is not None and chosen[-1] >= count:
        raise ValueError(f"config field 'text_encoder_layers': the text encoder has {count} layers "
                         f"(0..{count - 1}), got {value!r}")
    return chosen


def text_encoder_parameters(text_encoder, layers, part: str, final_layer_norm: bool) -> dict[str, torch.nn.Parameter]:
    """The text-encoder parameters AdvUnlearn trains, by state-dict key (module docstring)."""
    if part not in TEXT_ENCODER_PARTS:
        raise ValueError(f"config field 'text_encoder_part' must be one of {TEXT_ENCODER_PARTS}, got {part!r}")
    chosen = set(layer_indices(layers, text_encoder.config.num_hidden_layers))
    with_norm = final_layer_norm or (layers == "all" and part == "all")
    out = {}
    for key, param in text_encoder.named_parameters():
        name = key.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            in_part = part == "all" or (part == "ffn" and ".mlp." in name) or (part == "attn" and ".self_attn." in name)
            if int(name.split(".")[2]) in chosen and in_part:
                out[key] = param
        elif name.startswith("final_layer_norm.") and with_norm:
            out[key] = param
    if not out:
        raise ValueError("the text encoder has no encoder layers to train (text_encoder_layers / text_encoder_part)")
    return out


def retain_prompts(concepts: ConceptSet) -> list[str]:
    """The retain set: the concept file's preserved captions and preserved concepts' prompts, then
    the shipped generic captions that name no erased concept (in place of the official COCO object
    prompts); each once."""
    preserved = [src for c in concepts.preserve_concepts for _, src, _ in c.prompt_pairs()]
    kept, _ = naming_erased(generic_captions(), concepts)
    return list(dict.fromkeys([*concepts.preserve_captions, *preserved, *kept]))


def retain_indices(count: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """The retain prompts of training step ``step``: ``batch`` of them without replacement, a new
    seeded permutation of the ``count`` prompts each time fewer than ``batch`` are left unseen (as
    the official PromptDataset, prompt_dataset.py l.4-30). A function of the step alone, so a
    resumed run draws what an uninterrupted one does."""
    batch = min(batch, count)
    per_round = count // batch
    round_, slot = divmod(step, per_round)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + round_))
    return order[slot * batch : (slot + 1) * batch]
