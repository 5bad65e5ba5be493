"""CLIP embeddings of images and texts in one space, for the CLIP score and zero-shot classes.

One ``ClipScorer`` serves every suite; it is built from either kind of CLIP a suite has:

* ``ClipScorer.from_folder(DIR)``: a local transformers ``CLIPModel`` folder (the clip and fid
  suites): image embeddings ``get_image_features``, text embeddings ``get_text_features``;
* ``ClipScorer.from_pipeline(pipe, folder, world)``: a toy-world pipeline's own encoders (the
  toy suite): image embeddings ``image_encoder(feature_extractor(images)).image_embeds``, text
  embeddings ``text_projection @ text_encoder(prompt).pooler_output`` with the world's
  projection; returns (None, why not) when the pipeline or the world lacks a part.

Embeddings come back as float32 CPU tensors, not normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.evaluation.metrics import clip_score

PROJECTION_FILE = Path("clip") / "projection.safetensors"


def _features_tensor(out) -> torch.Tensor:
    # transformers returns the projected embeddings as a tensor, or (5.x) in pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """Image and text embeddings from two encoder functions, in batches of the given sizes.

    ``encode_images(uint8 images) -> (B, D)`` and ``encode_texts(list of str) -> (B, D)``
    tensors; ``text_batch=None`` embeds all texts of a call at once.
    """

    def __init__(self, encode_images, encode_texts, dim: int, image_batch: int = 64, text_batch: int | None = None):
        self.encode_images, self.encode_texts = encode_images, encode_texts
        self.dim = dim
        self.image_batch, self.text_batch = image_batch, text_batch

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_folder(cls, folder, device="cpu") -> ClipScorer:
        """A local transformers CLIP folder (config.json, .safetensors weights, tokenizer files and,
        optionally, preprocessor_config.json); pickled weights are refused."""
        folder = Path(folder)
        _check_clip_folder(folder)
        device = torch.device(device)
        model, tokenizer, processor = _load_clip_folder(folder, device)
        max_length = model.config.text_config.max_position_embeddings

        def encode_images(images):
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
            return _features_tensor(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))

        def encode_texts(texts):
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return _features_tensor(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))

        return cls(encode_images, encode_texts, model.config.projection_dim)

    @classmethod
    def from_pipeline(cls, pipe, folder: Path | None, world: Path | None,
                      batch: int = 256) -> tuple[ClipScorer | None, str | None]:
        """The scorer of a toy-world pipeline (its text and image encoders) with the world's text
        projection, or (None, why not). ``folder``: the pipeline's folder, where its
        feature_extractor is looked up when the loaded pipeline has none."""
        image_encoder, feature_extractor, reason = _pipeline_vision(pipe, folder)
        if reason is None:
            projection, reason = _world_projection(world, pipe, image_encoder)
        if reason is not None:
            return None, reason
        text_encoder, tokenizer = pipe.text_encoder, pipe.tokenizer

        def encode_images(images):
            pixels = feature_extractor(images=list(images), return_tensors="pt").pixel_values
            return image_encoder(pixel_values=pixels.to(image_encoder.device, image_encoder.dtype)).image_embeds

        def encode_texts(prompts):
            device = text_encoder.device
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            pooled = text_encoder(ids).pooler_output.float()  # B x D_text
            return pooled @ projection.to(device).T  # B x P

        dim = image_encoder.config.projection_dim
        return cls(encode_images, encode_texts, dim, image_batch=batch, text_batch=batch), None

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of uint8 RGB images (H, W, 3; sizes may differ)."""
        out = [self.encode_images(images[lo : lo + self.image_batch]).float().cpu()
               for lo in range(0, len(images), self.image_batch)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of texts."""
        step = self.text_batch or max(1, len(texts))
        out = [self.encode_texts(texts[lo : lo + step]).float().cpu() for lo in range(0, len(texts), step)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def class_embeddings(self, names: list[str], templates) -> torch.Tensor:
        """(C, D) unit vectors: each name's normalised template embeddings, averaged, renormalised."""
        rows = []
        for name in names:
            feats = torch.nn.functional.normalize(self.text_features([t.format(name) for t in templates]), dim=-1)
            rows.append(torch.nn.functional.normalize(feats.mean(0), dim=-1))
        return torch.stack(rows)

    def score(self, images, prompts: list[str]) -> float:
        """The CLIP score (mean cosine x 100) of image i and prompt i; each distinct prompt is
        embedded once."""
        unique = sorted(set(prompts))
        row = {p: i for i, p in enumerate(unique)}
        text = self.text_features(unique).double().numpy()
        image = self.image_features(images).double().numpy()
        return clip_score(image, text[[row[p] for p in prompts]])


def _check_clip_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: not a transformers CLIP model folder "
            "(expected config.json, the weights, the tokenizer files and preprocessor_config.json)"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no .safetensors weights; pickled weights (.bin) are not loaded, as they "
                         "can run code: convert the model (save_pretrained(..., safe_serialization=True))")


def _load_clip_folder(folder: Path, device: torch.device):
    from transformers import AutoTokenizer, CLIPModel

    try:  # the PIL processor is CLIP's own preprocessing; newer transformers name it so
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder}: no usable tokenizer files ({err})") from err
    if (folder / "preprocessor_config.json").is_file():
        processor = Processor.from_pretrained(str(folder), local_files_only=True)
    else:
        size = model.config.vision_config.image_size
        processor = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, tokenizer, processor


def _pipeline_vision(pipe, folder: Path | None):
    """(image_encoder, feature_extractor, None) of a pipeline, or (.., .., why not)."""
    image_encoder = getattr(pipe, "image_encoder", None)
    if image_encoder is None:
        return None, None, "the original model has no image_encoder (CLIP vision tower)"
    feature_extractor = getattr(pipe, "feature_extractor", None)
    if feature_extractor is None and folder is not None and (folder / "feature_extractor").is_dir():
        from transformers import CLIPImageProcessor

        # engine.models.load_pipeline drops the SD safety checker's processor; the world's is this one.
        feature_extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    if feature_extractor is None:
        return image_encoder, None, "the original model has no feature_extractor (CLIP image preprocessing)"
    return image_encoder, feature_extractor, None


def _world_projection(world: Path | None, pipe, image_encoder):
    """(the world's text projection, None) matching the pipeline's encoders, or (None, why not)."""
    from safetensors.torch import load_file

    if world is None:
        return None, "no toy world, so no CLIP text projection"
    proj_file = world / PROJECTION_FILE
    if not proj_file.is_file():
        return None, f"no CLIP projection file {proj_file}"
    tensors = load_file(str(proj_file))
    if "text_projection" not in tensors:
        return None, f"{proj_file} has no 'text_projection' tensor"
    projection = tensors["text_projection"].float()
    text_dim = pipe.text_encoder.config.hidden_size
    image_dim = image_encoder.config.projection_dim
    if projection.shape != (image_dim, text_dim):
        return None, (
            f"{proj_file}: text_projection is {tuple(projection.shape)}, but this model's image embeddings "
            f"are {image_dim}-d and its text encoder {text_dim}-d"
        )
    return projection, None
