"""`uce` against a plain per-layer fp64 implementation of UCE's equation, written from the paper.

UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024), eq. 7, for every
cross-attention K/V matrix W independently:

    W' = (lam W + sum_i W g_i c_i^T + sum_j W p_j p_j^T) (lam I + sum_i c_i c_i^T + sum_j p_j p_j^T)^-1

with c_i the erased concept's embedding, g_i its guide's and p_j a preserved concept's, each the
text encoder's output at the string's last token before [EoT] (the published code's
``attention_mask.sum() - 2``), lam = 0.5 and unit erase/preserve scales. Nothing here uses the
engine's row selection, Gram kernels or shared solve.
"""

import copy
from dataclasses import replace

import pytest
import torch

import engine
from engine.closed_form import accumulate, collect_rows, cross_attention_kv, solve_transform
from engine.methods import get_method
from engine.concepts import concepts_from_names
from engine.models import encode_prompts, load_pipeline

ERASE = ["Arlen Corrance", "Van Gogh", "skull"]
PRESERVE = ["Bexley Holloway", "a tree"]


def uce_reference(pipe, erase, guides, preserve, lam=0.5):
    """key -> W' per the equation above, all in float64, one layer at a time."""
    encoder = copy.deepcopy(pipe.text_encoder).double()

    def row(text):
        tok = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        last = int(tok.attention_mask.sum()) - 2
        with torch.no_grad():
            return encoder(tok.input_ids).last_hidden_state[0, last]  # (D,)

    pairs = [(row(c), row(g)) for c, g in zip(erase, guides)] + [(row(p), row(p)) for p in preserve]
    out = {}
    for key, module in cross_attention_kv(pipe.unet):
        W = module.weight.detach().double()
        mat1 = lam * W
        mat2 = lam * torch.eye(W.shape[1], dtype=torch.float64)
        for c, g in pairs:
            mat1 = mat1 + torch.outer(W @ g, c)
            mat2 = mat2 + torch.outer(c, c)
        out[key] = mat1 @ torch.linalg.inv(mat2)
    return out


def sd15_width_pipeline(tiny_sd_dir):
    """The tiny pipeline with SD1.5's text width: a seeded 768-wide, two-layer CLIP text encoder
    and a tiny UNet whose cross-attention takes 768."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.tiny import text_encoder_configs, unet_config

    pipe = load_pipeline(tiny_sd_dir)
    text_cfg = CLIPTextConfig(**{**text_encoder_configs("sd15")[0].to_dict(), "num_hidden_layers": 2})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        encoder = CLIPTextModel(text_cfg).eval()
        unet = UNet2DConditionModel(**{**unet_config("tiny"), "cross_attention_dim": 768}).eval()
    pipe.register_modules(text_encoder=encoder, unet=unet)
    return pipe


def rel_delta_error(result, reference, original) -> float:
    """max over matrices of ||dW - dW_ref|| / ||dW_ref||, deltas in float64."""
    worst = 0.0
    for key, ref in reference.items():
        d_ref = ref - original[key]
        d = result.delta[key].double() - original[key]
        worst = max(worst, float((d - d_ref).norm() / d_ref.norm()))
    return worst


@pytest.mark.parametrize("width", ["tiny", "sd15-width"])
def test_uce_matches_the_papers_equation_in_fp64(tiny_sd_dir, width):
    pipe = load_pipeline(tiny_sd_dir) if width == "tiny" else sd15_width_pipeline(tiny_sd_dir)
    pipe.to(torch.float64)
    original = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(pipe.unet)}
    reference = uce_reference(pipe, ERASE, [""] * len(ERASE), PRESERVE)
    concepts = concepts_from_names(ERASE, preserve=PRESERVE)  # bare strings, guide "": UCE's defaults
    # The Gram kernels are checked against torch in their own tests; Triton's CPU interpreter is slow at 768.
    result = engine.erase(pipe, concepts, method="uce", progress=False, backend="torch")
    assert result.manifest["solve"]["rows"] == {"edit": 3, "preserve": 2, "caption": 0}
    assert rel_delta_error(result, reference, original) < 1e-6
    # The deltas are real edits, not rounding: each moves its matrix.
    assert min(float((result.delta[k].double() - original[k]).norm() / original[k].norm()) for k in original) > 1e-3


def test_uce_on_an_fp32_model_is_within_1e_4_of_the_fp64_equation(tiny_sd_dir):
    pipe = sd15_width_pipeline(tiny_sd_dir)
    original = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(pipe.unet)}
    reference = uce_reference(pipe, ERASE, ["", "art", ""], PRESERVE)
    concepts = concepts_from_names(ERASE, preserve=PRESERVE)
    concepts = replace(concepts, concepts=tuple(replace(c, anchor="art" if c.name == "Van Gogh" else "")
                                                for c in concepts.concepts))
    result = engine.erase(pipe, concepts, method="uce", progress=False, backend="torch")
    assert rel_delta_error(result, reference, original) < 1e-4


def test_the_guide_row_is_the_guides_own_last_token(tiny_sd_dir):
    """A two-token concept guided to a one-token word maps onto that word, not onto the position
    the concept's last token has (UCE takes each string's own last token)."""
    pipe = load_pipeline(tiny_sd_dir)
    concepts = concepts_from_names(["Van Gogh"], anchor="art")
    rows = collect_rows(pipe, concepts, get_method("uce").defaults.replace(progress=False))
    emb, ids = encode_prompts(pipe, ["Van Gogh", "art"])
    eot = pipe.tokenizer.eos_token_id
    src_pos, tgt_pos = ids[0].tolist().index(eot) - 1, ids[1].tolist().index(eot) - 1
    assert (src_pos, tgt_pos) == (2, 1)  # <start> van gogh <eot> ; <start> art <eot>
    assert torch.allclose(rows.table[rows.src_index[0]], emb[0, src_pos], atol=1e-6)
    assert torch.allclose(rows.table[rows.tgt_index[0]], emb[1, tgt_pos], atol=1e-6)


def test_reported_condition_number_is_the_systems(tiny_sd_dir):
    pipe = sd15_width_pipeline(tiny_sd_dir)
    concepts = concepts_from_names(ERASE, preserve=PRESERVE)
    cfg = get_method("uce").defaults.replace(progress=False, backend="torch")
    S, _ = accumulate(collect_rows(pipe, concepts, cfg), "torch", "float64")  # before the edit
    result = engine.erase(pipe, concepts, method="uce", config=cfg)
    true = float(torch.linalg.cond(S + cfg.ridge * torch.eye(S.shape[0], dtype=torch.float64)))
    assert true > 100  # a system worth reporting on
    assert true / 2 <= result.manifest["solve"]["condition"] <= true * 2


def test_max_condition_switches_the_solver():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(8, 24, dtype=torch.float64, generator=g)
    e[:, 0] *= 1e3  # one direction far stronger than the rest: a large but finite condition number
    S, C = e.T @ e, torch.randn(8, 24, dtype=torch.float64, generator=g).T @ e
    ridge = 1e-2
    cond = float(torch.linalg.cond(S + ridge * torch.eye(24, dtype=torch.float64)))
    assert 1e6 < cond < 1e12
    _, solver, reported = solve_transform(S, C, ridge=ridge, max_condition=cond * 1.5)
    assert solver == "cholesky" and reported == pytest.approx(cond, rel=1e-6)
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        _, solver, reported = solve_transform(S, C, ridge=ridge, max_condition=cond / 1.5)
    assert solver == "eigen-clamped" and reported == pytest.approx(cond, rel=1e-6)


def test_the_cli_one_liner_gives_uce_on_a_names_file(tiny_sd_dir, tmp_path):
    """`erasure erase --model M --concepts names.txt --method uce --out O` on an SD1.x folder."""
    from safetensors.torch import load_file

    from engine.cli import main

    names = tmp_path / "names.txt"
    names.write_text("\n".join(ERASE) + "\n")
    out = tmp_path / "out"
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--method", "uce", "--out", str(out),
                 "--no-pipeline", "--quiet"]) == 0
    pipe = load_pipeline(tiny_sd_dir)
    original = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(pipe.unet)}
    reference = uce_reference(pipe, ERASE, [""] * len(ERASE), [])
    edited = load_file(str(out / "delta.safetensors"))
    worst = max(float(((edited[k].double() - original[k]) - (ref - original[k])).norm() / (ref - original[k]).norm())
                for k, ref in reference.items())
    assert worst < 1e-4
