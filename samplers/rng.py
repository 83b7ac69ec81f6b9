"""Per-sample random streams: sample i draws only from a generator seeded by (seed, i).

That makes the set of samples independent of the batch size and of the number of processes.
Priors take ``generators: list[torch.Generator]`` (one per batch row) and draw through these helpers.
"""

import torch


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def streams(seed: int, indices, device="cpu") -> list[torch.Generator]:
    """One generator per sample index, on ``device``."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, int(i)))
        gens.append(g)
    return gens


def rand(generators, *shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws, [B, *shape], row b from generators[b]."""
    return torch.stack([torch.rand(shape, generator=g, device=device, dtype=dtype) for g in generators])


def randn(generators, *shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws, [B, *shape], row b from generators[b]."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def randint(generators, high: int, *shape, device="cpu") -> torch.Tensor:
    """Integers in [0, high), [B, *shape], row b from generators[b]."""
    return torch.stack([torch.randint(high, shape, generator=g, device=device) for g in generators])


def categorical(generators, probs: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of probs [B, ..., V] (any leading dims after B) -> [B, ...].

    Inverse-CDF sampling with one uniform per position from the row's own stream, so a row's
    draw does not depend on the other rows.
    """
    u = rand(generators, *probs.shape[1:-1], device=probs.device, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:].clamp_min(1e-300)
    idx = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)
