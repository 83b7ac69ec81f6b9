"""Improved precision and recall (k-NN manifolds), as in the ADM evaluator.

Each set's manifold is the union of balls around its features, the radius of a ball being the distance
to that feature's k-th nearest neighbour in its own set (k = 3). Precision is the fraction of sample
features inside the reference manifold; recall the fraction of reference features inside the sample
manifold. Distances are computed block by block, so 50k x 50k never materialises.
"""

import numpy as np
import torch

from engine.errors import TesseraError


def _blocks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def knn_radii(features: torch.Tensor, k: int = 3, row_block: int = 1024,
              col_block: int = 8192) -> torch.Tensor:
    """features [N, D] -> [N] distance from each feature to its k-th nearest neighbour in the set.

    The feature itself sits at distance 0, so the k-th neighbour is entry k of the ascending distances.
    """
    n = len(features)
    if n <= k:
        raise TesseraError(f"precision/recall with k={k} needs more than {k} features per set, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0, r1 in _blocks(n, row_block):
        nearest = None
        for c0, c1 in _blocks(n, col_block):
            d = torch.cdist(features[r0:r1], features[c0:c1])
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r0:r1] = nearest[:, k]
    return radii


def inside_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                    row_block: int = 1024, col_block: int = 8192) -> torch.Tensor:
    """query [Nq, D], support [Ns, D] with radii [Ns] -> bool [Nq]: within radius of some support feature."""
    inside = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    for r0, r1 in _blocks(len(query), row_block):
        for c0, c1 in _blocks(len(support), col_block):
            d = torch.cdist(query[r0:r1], support[c0:c1])
            inside[r0:r1] |= (d <= radii[None, c0:c1]).any(dim=1)
    return inside


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, device="cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """reference [Nr, D], samples [Ns, D] (e.g. Inception pool features) -> (precision, recall).

    float32 on the given device, like the evaluator's TF graph; pass dtype=torch.float64 for exactness.
    """
    ref = torch.as_tensor(np.asarray(reference), dtype=dtype, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=dtype, device=device)
    if ref.dim() != 2 or gen.dim() != 2 or ref.shape[1] != gen.shape[1]:
        raise TesseraError(f"precision/recall needs two feature sets [N, D] of one width, got "
                           f"{tuple(ref.shape)} and {tuple(gen.shape)}")
    ref_radii, gen_radii = knn_radii(ref, k), knn_radii(gen, k)
    precision = inside_manifold(gen, ref, ref_radii).double().mean().item()
    recall = inside_manifold(ref, gen, gen_radii).double().mean().item()
    return precision, recall
