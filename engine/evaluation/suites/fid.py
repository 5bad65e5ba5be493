"""The fid suite: Frechet distance between an edited model's images and a set of reference images.

Generations for a prompt file (CSV or .txt) are compared with a folder of reference images on
the features of a local model: CLIP image embeddings (``clip_model``), i.e. "CLIP-FID" as
clean-fid's clip_vit_b_32 mode computes it, since the Inception weights cannot be fetched here;
or a TorchScript Inception file (``inception``, e.g. the inception-2015-12-05.pt that clean-fid
and StyleGAN use; it wins over ``clip_model``). KID (engine.evaluation.metrics.kid) against the
same reference set is reported with it. Values compare only between runs with the same feature
model, image count and reference set.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.evaluation.clip_scorer import ClipScorer
from engine.evaluation.metrics import KID_SUBSET_SIZE, KID_SUBSETS, frechet_distance, gaussian_stats, kid
from engine.evaluation.suites.base import PathLike, PromptSuiteSettings, SuiteRun

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_SIZE = 299


@dataclass(frozen=True)
class FidSettings(PromptSuiteSettings):
    """The fid suite's settings: the prompt file's (see PromptSuiteSettings), the reference image
    folder (searched recursively) and the feature model: a CLIP folder or an Inception file."""

    reference: PathLike | None = None
    clip_model: PathLike | None = None
    inception: PathLike | None = None

    suite = "fid"

    def __post_init__(self):
        super().__post_init__()
        if not self.reference:
            raise ValueError("--suite fid needs --reference DIR: a folder of reference images")


class InceptionFeatures:
    """A TorchScript Inception feature model (e.g. inception-2015-12-05.pt).

    Images are resized to 299x299 (bicubic, antialiased) and passed as float32 (B, 3, 299, 299)
    in [0, 255], as clean-fid does; `return_features=True` is passed when the module's forward has
    that argument (the StyleGAN/clean-fid file does: it then returns the 2048-d pool features).
    The module must return (B, D) features.
    """

    def __init__(self, path, device="cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception TorchScript file not found: {path}")
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated, but it is the format the standard Inception file ships in.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path} is not a TorchScript module ({err})") from err
        names = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in names else {}
        self.name = f"inception:{path}"

    @staticmethod
    def _resize(image: np.ndarray) -> torch.Tensor:
        x = torch.tensor(np.asarray(image, np.uint8)).permute(2, 0, 1)[None].float()
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        return torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> np.ndarray:
        """(N, D) float64 features of a sequence of uint8 RGB images (H, W, 3), sizes may differ."""
        out = []
        for lo in range(0, len(images), batch_size):
            x = torch.cat([self._resize(image) for image in images[lo : lo + batch_size]])
            feats = self.module(x.clamp(0, 255).to(self.device), **self.kwargs)
            if feats.ndim != 2:
                raise ValueError(f"{self.name} returned features of shape {tuple(feats.shape)}, expected (batch, dim)")
            out.append(feats.double().cpu().numpy())
        return np.concatenate(out)


class ClipFeatures:
    """CLIP image embeddings as FID features ("CLIP-FID")."""

    def __init__(self, folder, device="cpu"):
        self.scorer = ClipScorer.from_folder(folder, device)
        self.name = f"clip:{folder}"

    def __call__(self, images) -> np.ndarray:
        """(N, D) float64 features of a sequence of uint8 RGB images (H, W, 3), sizes may differ."""
        return self.scorer.image_features(images).double().numpy()


def feature_model(s: FidSettings, device):
    """The Inception file's features if one is given, else the CLIP folder's."""
    if s.inception:
        return InceptionFeatures(s.inception, device)
    if s.clip_model:
        return ClipFeatures(s.clip_model, device)
    raise ValueError("--suite fid needs a feature model: --clip-model DIR (CLIP-FID) or --inception FILE (TorchScript)")


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read reference image {path}: {err}") from err


def reference_features(extractor, files: list[Path], batch_size: int = 32, progress: bool = True) -> np.ndarray:
    from engine.progress import progress_bar

    out = []
    for lo in progress_bar(range(0, len(files), batch_size), desc="reference features", unit="batch", progress=progress):
        # Reference images may differ in size: the extractors resize each image on its own.
        out.append(extractor([_read_image(p) for p in files[lo : lo + batch_size]]))
    return np.concatenate(out)


def _warn_if_rank_deficient(n_generated: int, ref: np.ndarray) -> None:
    if min(len(ref), n_generated) <= ref.shape[1]:
        warnings.warn(
            f"FID on {n_generated} generated and {len(ref)} reference images with {ref.shape[1]}-d features: "
            "the covariances are rank-deficient and the value is strongly biased; use more images than dimensions",
            RuntimeWarning,
            stacklevel=3,
        )


def _scores(run: SuiteRun, features: dict, ref: np.ndarray, ref_stats, seed: int) -> dict:
    """{tag: (FID, KID mean, KID std)} of each model's features against the reference features."""
    ref_mu, ref_sigma = ref_stats
    scores = {}
    for tag, parts in features.items():
        t = time.perf_counter()
        feats = np.concatenate(parts)
        mu, sigma = gaussian_stats(feats)
        kid_mean, kid_std = kid(feats, ref, seed=seed)
        scores[tag] = (frechet_distance(mu, sigma, ref_mu, ref_sigma), kid_mean, kid_std)
        run.clock["scoring_seconds"] += time.perf_counter() - t
    return scores


def _quality(scores: dict, extractor, n_generated: int, ref: np.ndarray) -> dict:
    quality = {
        "fid": scores["model"][0],
        "kid": scores["model"][1],
        "kid_std": scores["model"][2],
        "fid_features": extractor.name,
        "kid_features": extractor.name,
        "kid_reference": "the --reference images (not the original model's)",
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, n_generated, len(ref)),
        "feature_dim": int(ref.shape[1]),
        "generated_images": n_generated,
        "reference_images": len(ref),
        "clip_score_reason": "the fid suite measures image statistics only",
    }
    if "original" in scores:
        quality.update(
            fid_original=scores["original"][0],
            kid_original=scores["original"][1],
            kid_std_original=scores["original"][2],
        )
    return quality


def fid_suite(s: FidSettings, return_samples: bool = False):
    """Run the fid suite; returns the report (``return_samples``: (report, grid samples or None))."""
    run = SuiteRun(s)
    pf = s.read_prompts()
    files = list_images(s.reference)
    if len(files) < 2:
        raise ValueError(f"reference folder {s.reference} holds {len(files)} image; FID needs at least 2")
    jobs = s.jobs(pf)
    if len(jobs) < 2:
        raise ValueError(f"FID needs at least 2 generated images; {s.prompts} gives {len(jobs)}")
    run.keep_for_grid(jobs, list(range(len(pf.rows))), lambda owner, prompt: prompt)

    t = time.perf_counter()
    extractor = feature_model(s, run.device)
    ref = reference_features(extractor, files, progress=run.progress)
    ref_stats = gaussian_stats(ref)
    run.clock["scoring_seconds"] += time.perf_counter() - t
    _warn_if_rank_deficient(len(jobs), ref)

    features = {tag: [] for tag, _ in run.models}
    run.generate_and_score(jobs, lambda tag, start, images: features[tag].append(extractor(images)))
    scores = _scores(run, features, ref, ref_stats, s.seed)
    quality = _quality(scores, extractor, len(jobs), ref)
    settings = {**s.report_settings(pf), "reference": str(s.reference), "features": extractor.name}
    report = run.report("fid", settings, quality=quality)
    return (report, run.samples()) if return_samples else report
