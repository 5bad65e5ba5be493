"""text-gate (engine/methods/text_gate.py) on the shipped toy world's trained text encoder: gated
rows move to the anchor's, every other row stays exactly as it was, and the widened encoder is
an ordinary model that saves and loads."""

import pytest
import torch

from engine.api import apply_delta, erase
from engine.concepts import concepts_from_names
from engine.methods import TextGateConfig, get_method
from engine.methods.text_gate import RAMP_HEIGHT, _last_mlp, build_gates, widened_text_encoder
from engine.models import encode_prompts, load_pipeline
from engine.toyworld import concepts as world_concepts
from engine.toyworld.world import load_toy_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KEPT = ["a red star on grass", "a portrait of {}", "{} smiling", "a house in the style of watercolor", ""]


@pytest.fixture(scope="module")
def names():
    return world_concepts("identity")[:2], world_concepts("identity")[40]


@pytest.fixture(scope="module")
def erased(names):
    """(the original pipeline, the result of erasing two identities)."""
    erase_names, _ = names
    original = load_toy_pipeline()
    return original, erase(load_toy_pipeline(), erase_names, method="text-gate", anchor="a person", progress=False)


def eot_rows(pipe, prompts):
    emb, ids = encode_prompts(pipe, prompts)
    return emb[torch.arange(len(prompts)), (ids == pipe.tokenizer.eos_token_id).int().argmax(1)]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rows"):
        TextGateConfig(rows="all")
    with pytest.raises(ValueError, match="ramp"):
        TextGateConfig(ramp=0.0)
    with pytest.raises(ValueError, match="neighbours"):
        TextGateConfig(neighbours=-1)


def test_everything_else_is_unchanged_and_the_names_move_to_the_anchor(erased, names):
    original, result = erased
    erase_names, other = names
    kept = [t.format(other) for t in KEPT]
    before, _ = encode_prompts(original, kept)
    after, _ = encode_prompts(result.pipeline, kept)
    assert (after - before).abs().max() < 1e-4  # no gate opens on them
    for name in erase_names:
        prompts = [f"a photograph of {name} outdoors", "a photograph of a person outdoors"]  # not a carrier
        b, a = eot_rows(original, prompts), eot_rows(result.pipeline, prompts)
        assert (a[0] - a[1]).norm() < 0.35 * (b[0] - b[1]).norm()
    report = result.manifest["gates"]
    assert report["gates"] == 4 and report["gate_open_on_own_prompts"] > 0.9


def test_the_neurons_compute_the_gates_formula(names):
    """The widened MLP against a plain re-computation of sum_i g_i(x) d_i on the original model."""
    erase_names, _ = names
    pipe = load_toy_pipeline()
    cfg = get_method("text-gate").defaults.replace(progress=False)
    gates = build_gates(pipe, concepts_from_names(erase_names, anchor="a person"), cfg)
    wide = widened_text_encoder(pipe.text_encoder, gates)
    mlp = _last_mlp(pipe.text_encoder)
    x = torch.randn(5, mlp.fc1.in_features, dtype=torch.float64)
    x[:2] = gates["center"] + gates["keys"][:2] * (gates["scale"][:2] * (gates["full"][:2] + 0.1))[:, None]  # open
    p = ((x - gates["center"]) @ gates["keys"].T) / gates["scale"]
    z = RAMP_HEIGHT * (p - gates["lo"]) / (gates["full"] - gates["lo"])
    g = (mlp.activation_fn(z) - mlp.activation_fn(z - RAMP_HEIGHT)) / RAMP_HEIGHT
    reference = mlp.double()(x) + g @ gates["shifts"]
    got = _last_mlp(wide).double()(x)
    assert g[:2].diagonal().min() > 0.9  # the test reaches open gates
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)  # the new weights are stored in float32


def test_saved_pipeline_loads_widened_and_the_delta_is_refused(erased, tmp_path, names):
    original, result = erased
    out = result.save(tmp_path / "out")
    loaded = load_pipeline(out)
    wide = result.pipeline.text_encoder.config.intermediate_size
    assert loaded.text_encoder.config.intermediate_size == wide == original.text_encoder.config.intermediate_size + 8
    prompts = [f"a photograph of {names[0][0]}", "a red star on grass"]
    torch.testing.assert_close(encode_prompts(loaded, prompts)[0], encode_prompts(result.pipeline, prompts)[0])
    with pytest.raises(ValueError, match="shape"):  # the delta widens tensors: only the saved pipeline carries it
        apply_delta(load_toy_pipeline(), out / "delta.safetensors")


def test_sdxl_is_refused(tiny_sdxl_dir):
    with pytest.raises(ValueError, match="SDXL"):
        erase(tiny_sdxl_dir, ["Ann Lee"], method="text-gate", progress=False)


def test_a_preserved_prompt_over_77_tokens_is_an_error(names):
    from engine.concepts import ConceptFileError

    erase_names, other = names
    cs = concepts_from_names(erase_names[:1], anchor="a person", captions=["a long caption " * 30])
    with pytest.raises(ConceptFileError, match="77|too long|shorten"):
        erase(load_toy_pipeline(), cs, method="text-gate", progress=False)


def test_export_lora_is_refused_with_nothing_written(erased, tmp_path):
    _, result = erased
    with pytest.raises(ValueError, match="same shape"):
        result.save(tmp_path / "lora", export_lora=True)
    assert not (tmp_path / "lora").exists()
