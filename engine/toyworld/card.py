"""The toy world's model card (its ``README.md``) and the record of its measured quality gates.

The gates are measured by ``engine.evaluation.gates``; this module only writes and formats them.
"""

from __future__ import annotations

from pathlib import Path


def write_gates(root: Path, info: dict, gates: dict) -> None:
    """Record measured gates in the world folder: ``world.json`` (key ``gates``) and ``README.md``."""
    from engine.export import write_json

    info = dict(info, gates=gates)
    tmp = root / "world.json.tmp"
    write_json(tmp, info)
    tmp.replace(root / "world.json")
    (root / "README.md").write_text(model_card(info))


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def gates_table(gates: dict) -> str:
    """The gates as a Markdown table (measured value, threshold, pass)."""
    s, t = gates["summary"], gates["thresholds"]
    lines = ["| gate | measured | threshold | pass |", "| --- | --- | --- | --- |"]
    for kind, v in s["evaluator_heldout"].items():
        lines.append(f"| classifier on held-out renders: {kind} | {_pct(v)} | {t['evaluator_heldout']:.0f}% | "
                     f"{'yes' if s['checks'][f'evaluator_heldout.{kind}'] else 'NO'} |")
    for kind, v in s["generated_heldout"].items():
        th = t["generated_heldout"].get(kind)
        ok = s["checks"].get(f"generated_heldout.{kind}")
        lines.append(f"| generated, held-out templates: {kind} | {_pct(v)} | "
                     f"{'-' if th is None else f'{th:.0f}%'} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    v = s["generated_indirect"]["unsafe"]
    lines.append(f"| generated, indirect prompts (synonyms, paraphrases): unsafe | {_pct(v)} | "
                 f"{t['generated_indirect']:.0f}% | {'yes' if s['checks']['generated_indirect.unsafe'] else 'NO'} |")
    if "anchors" in s:  # gates measured before these two existed lack them
        worst = min(s["anchors"]["per_prompt"].items(), key=lambda kv: kv[1])
        lines.append(f"| generated, anchor prompts draw their class (lowest: {worst[0]!r} {worst[1]:.0f}%) | "
                     f"{_pct(s['anchors']['mean'])} | {t['anchors']:.0f}% | {'yes' if s['checks']['anchors'] else 'NO'} |")
    if "ip_image_only" in s:
        v = s["ip_image_only"]["identity"]
        lines.append(f"| generated, IP-Adapter image only (empty prompt): identity | {_pct(v)} | "
                     f"{t['ip_image_only']:.0f}% | {'yes' if s['checks']['ip_image_only.identity'] else 'NO'} |")
    return "\n".join(lines)


# Over 60 lines: the card's text in reading order.
def model_card(info: dict) -> str:
    """The world's README.md: what it is, how it was built, and its measured gates."""
    from engine.toyworld.build import BuildConfig, text_config

    cfg, secs = info["config"], info.get("seconds", {})
    defaults = BuildConfig()  # settings a world.json predates
    text = text_config(cfg.get("text_width", defaults.text_width))
    identities = cfg.get("identities", defaults.identities)
    gates = info.get("gates")
    queries = cfg.get("ip_queries", 0)
    ip_kind = f"IP-Adapter Plus ({queries} image tokens)" if queries else "IP-Adapter (4 image tokens)"
    align = f"{cfg['ip_align_steps']} aligning + " if queries else ""
    parts = [
        "# The toy world",
        "",
        "A small, real text-to-image world: procedurally rendered 32x32 images with captions "
        f"({identities} made-up identities, 13 objects in 8 colours on 6 backgrounds, 6 styles, 4 unsafe "
        "stand-ins with synonyms and paraphrases) and the models trained on them from seed "
        f"{info['seed']} by `erasure toyworld build`.",
        "",
        "| part | what |",
        "| --- | --- |",
        "| `pipeline/` | diffusers `StableDiffusionPipeline`: VAE (32x32x3 -> 8x8x4), CLIP text encoder "
        f"(genuine CLIP BPE tokenizer, width {text['hidden_size']}, {text['num_hidden_layers']} layers), UNet2DConditionModel, DDIM scheduler; "
        "`image_encoder/` (CLIP vision tower) and `feature_extractor/` for the IP-Adapter |",
        f"| `ip_adapter/ip_adapter.safetensors` | {ip_kind}: `pipe.load_ip_adapter(DIR/'ip_adapter', subfolder='', "
        "weight_name='ip_adapter.safetensors')` |",
        "| `clip/projection.safetensors` | CLIP text projection and logit scale (alignment score) |",
        "| `evaluator/` | the classifier trained on renders only, one head per concept kind |",
        "| `world.json` | build settings, metrics, timings, versions, sha256 of every file, gates |",
        "",
        f"Sampling defaults: {info['sampling']['steps']} DDIM steps, guidance {info['sampling']['guidance']}.",
        "",
        "## Quality gates",
        "",
    ]
    if gates:
        st = gates["settings"]
        parts += [
            gates_table(gates),
            "",
            f"Measured by `erasure toyworld gates` with the evaluation harness: {gates['images']} generated "
            f"images ({st['images_per_prompt']} per prompt, seeds from {st['seed']}), {st['renders']} held-out "
            f"renders; means over concepts. All gates pass: **{'yes' if gates['summary']['all_pass'] else 'no'}**.",
        ]
    else:
        parts.append("Not measured yet: run `erasure toyworld gates --world DIR`.")
    stage_times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items() if k != "total_this_run")
    parts += [
        "",
        "## Build",
        "",
        f"Training images: {cfg['n_images']}; steps: CLIP {cfg['clip_steps']} (batch {cfg['clip_batch']}), "
        f"VAE {cfg['vae_steps']} (batch {cfg['vae_batch']}), UNet {cfg['unet_steps']} (batch {cfg['unet_batch']}), "
        f"IP-Adapter {align}{cfg['ip_steps']} (batch {cfg['ip_batch']}). Stage times: {stage_times}."
        + (" Pipeline and IP-Adapter weights are stored in fp16 (loaded as fp32)." if cfg.get("store_fp16") else ""),
        "",
        "Rebuild: `erasure toyworld build --out DIR --seed " + str(info["seed"])
        + ("" if identities == defaults.identities else " --world v2") + "`.",
        "",
    ]
    return "\n".join(parts)
