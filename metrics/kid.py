"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets."""

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """(gamma <x, y> + coef0) ** degree, gamma = 1 / D by default: [N, D], [M, D] -> [N, M]."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices of two equally sized sets (diagonals of k_xx, k_yy dropped)."""
    m = len(k_xx)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_1: np.ndarray, features_2: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> tuple[float, float, int]:
    """[N1, D], [N2, D] -> (mean, std, subset size used) of MMD^2 over ``subsets`` random subsets.

    Defaults are torch-fidelity's (100 subsets of 1000, seed 2020, the same draw order); the subset size
    is lowered to min(N1, N2) for smaller sets, where torch-fidelity refuses.
    """
    features_1, features_2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    n1, n2 = len(features_1), len(features_2)
    size = min(subset_size, n1, n2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {n1} and {n2}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = features_1[rng.choice(n1, size, replace=False)]
        y = features_2[rng.choice(n2, size, replace=False)]
        mmds[i] = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(x, y), polynomial_kernel(y, y))
    return float(mmds.mean()), float(mmds.std()), size
