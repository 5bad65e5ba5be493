"""The evaluation metrics: accuracy, the efficacy/specificity trade-off H, KID, FID and the CLIP score.

Plain numpy (float64) so every number can be checked by hand; the callers extract features
and embeddings with torch and pass arrays.

* ``percent(hits, n)``: 100 * hits / n.
* ``harmonic_h(erased_acc, retained_acc)``: the harmonic mean of ``100 - erased_acc`` (how
  much of the erased concepts is gone) and ``retained_acc`` (how much of the rest is kept),
  both in percent; 0 when either is 0.
* ``kid(x, y)``: Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", 2018):
  the unbiased estimate of the squared MMD between two feature sets under the cubic
  polynomial kernel ``k(a, b) = (a.b / d + 1) ** 3`` (``d`` the feature dimension), averaged
  over random subsets of equal size; returns the mean and standard deviation over subsets.
* ``clip_score(image_embeds, text_embeds)``: mean cosine similarity x 100 of matching rows.
* ``frechet_distance(mu1, sigma1, mu2, sigma2)``: the Frechet distance between two Gaussians
  (FID on the ``gaussian_stats`` of two feature sets).
"""

from __future__ import annotations

import numpy as np

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def percent(hits: int, n: int) -> float:
    if n <= 0:
        raise ValueError(f"cannot take a percentage of {n} samples")
    return 100.0 * hits / n


def harmonic_h(erased_acc: float, retained_acc: float) -> float:
    """Harmonic mean of (100 - erased_acc) and retained_acc, all in percent (0 when either is 0)."""
    for name, value in (("erased_acc", erased_acc), ("retained_acc", retained_acc)):
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
    gone = 100.0 - erased_acc
    if gone == 0.0 or retained_acc == 0.0:
        return 0.0
    return 2.0 * gone * retained_acc / (gone + retained_acc)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x y^T / d + 1) ** 3``: KID's kernel matrix between the rows of x (m x d) and y (n x d)."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD between samples x (m x d) and y (n x d) under ``polynomial_kernel``.

    The within-set means leave out the diagonal (k(a, a) is not an independent pair), which is
    what makes the estimate unbiased: it is ~0, and can be slightly negative, for two samples
    of one distribution.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    xy = kxy.sum() / (m * n)
    return float(xx + yy - 2.0 * xy)


def kid(
    x: np.ndarray, y: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float | None]:
    """KID between feature sets x (m x d) and y (n x d): (mean, std) of ``mmd2_unbiased`` over
    ``subsets`` random subsets of ``min(subset_size, m, n)`` rows from each (without replacement).

    The std is None when both sets are no bigger than ``subset_size``: every subset is then the
    whole set, so the spread over subsets says nothing."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs two 2-D feature arrays of the same width, got shapes {x.shape} and {y.shape}")
    if subsets < 1:
        raise ValueError(f"KID needs at least one subset, got subsets={subsets}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(subsets)
        ]
    )
    whole_sets = size == len(x) and size == len(y)
    return float(values.mean()), None if whole_sets else float(values.std())


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """Mean cosine similarity x 100 between row i of image_embeds and row i of text_embeds."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2 or not len(a):
        raise ValueError(f"CLIP score needs matching non-empty N x P embeddings, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(100.0 * (a * b).sum(1).mean())


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1)-normalised covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    S1 S2 is not symmetric, but R S2 R with R = S1^(1/2) is symmetric positive semi-definite with
    the same eigenvalues, so tr((S1 S2)^(1/2)) is the sum of the square roots of its eigenvalues:
    two symmetric eigendecompositions, no scipy, no complex round-off to discard.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    root = _psd_sqrt(s1)
    middle = root @ s2 @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())
