"""Inception Score: exp(E_x KL(p(y|x) || p(y))), mean and std over splits (torch-fidelity's protocol)."""

import numpy as np
import torch


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True,
                    seed: int = 2020) -> tuple[float, float]:
    """logits: unbiased Inception logits [N, 1008] -> (mean, std) of the per-split scores.

    Rows are shuffled with ``np.random.RandomState(seed).permutation`` and cut into ``splits``
    contiguous chunks [i*N//splits, (i+1)*N//splits), as torch-fidelity does (10 splits, seed 2020).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        marginal = p[lo:hi].mean(dim=0, keepdim=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - marginal.log())).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
