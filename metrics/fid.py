"""Fréchet distance between two Gaussians fitted to features (FID and friends)."""

import numpy as np

from engine.errors import TesseraError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features: [N, D] -> (mu [D], sigma [D, D]) in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise TesseraError(f"need features [N >= 2, D] for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrt(s1 s2)).

    Tr sqrt(s1 s2) is computed as Tr sqrt(r s2 r) with r = sqrt(s1): the same eigenvalues, but of a
    symmetric PSD matrix, so it is exact up to round-off even for the rank-deficient covariances of
    small sample sets, and several times faster than a general matrix square root (same value as the
    ADM evaluator's scipy sqrtm to ~1e-12 relative on full-rank covariances).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise TesseraError(f"statistics disagree in shape: {mu1.shape}/{sigma1.shape} "
                           f"vs {mu2.shape}/{sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise TesseraError(f"{name} has non-finite entries")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    eig = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)  # round-off can dip below 0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum())
