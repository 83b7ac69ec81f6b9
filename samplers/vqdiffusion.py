"""Reverse processes of the discrete (VQ-)diffusion prior.

The loops take
    diffusion   a models.priors.vqdiffusion.MaskReplaceDiffusion (K codes, mask = K, T steps, posterior(),
                gbar the cumulative mask probabilities [T + 1])
    predict     (x_t [B, N] ids, t int) -> log p(x_0 | x_t) [B, N, K + 1] after guidance and truncation
and draw every random number from the row's own generator (samplers.rng), so sample b depends only on
generators[b]. Nothing here keeps state between calls.

``reverse_posterior``: start all-[MASK]; at each visited step t (next visited step s < t) draw every position
from p(x_s | x_t) = sum_k q(x_s | x_t, x_0 = k) p(x_0 = k | x_t). With all T steps visited this is the
released sampler; with fewer (``visited_steps(T, n)``) the jumps use the exact multi-step posterior.

``reverse_fixed_budget``: the fixed-budget unmasking of the improved model. Step t -> s reveals masked
positions until N (gbar_T - gbar_s) / gbar_T are revealed (all at s = 0), at most ``reveal_per_call`` per
network call; positions are drawn without replacement, uniformly or, with ``purity``, in proportion to
their purity max_k p(x_0 = k) (normalised by the image's largest); values are drawn from p(x_0), sharpened
to softmax((1 + r * purity) log p) when purity_weight r > 0. Revealed tokens never change.
"""

import numpy as np
import torch

from samplers.rng import categorical, rand

SAMPLERS = ("posterior", "fixed_budget", "purity")
MAX_TRACE_FRAMES = 32


def visited_steps(T: int, num_steps: int = 0) -> list[tuple[int, int]]:
    """(t, s) jumps from T down to 0: every step when num_steps is 0 or >= T, else num_steps evenly spaced."""
    if num_steps <= 0 or num_steps >= T:
        points = list(range(T, -1, -1))
    else:
        points = sorted({int(round(v)) for v in np.linspace(T, 0, num_steps + 1)}, reverse=True)
    return list(zip(points[:-1], points[1:]))


def _trace_every(num_steps: int) -> int:
    return max(1, -(-num_steps // MAX_TRACE_FRAMES))


def _visible(x: torch.Tensor, mask_id: int) -> torch.Tensor:
    return x.masked_fill(x == mask_id, -1)


def _probs(log_p: torch.Tensor) -> torch.Tensor:
    return (log_p - log_p.amax(-1, keepdim=True)).exp()


@torch.no_grad()
def reverse_posterior(diffusion, predict, num_tokens: int, generators, steps, trace: bool = False, device="cpu"):
    """-> (codes [B, N] in [0, K), states: partial grids [B, N] (-1 = masked), blank first, when trace)."""
    B, K = len(generators), diffusion.K
    x = torch.full((B, num_tokens), K, dtype=torch.long, device=device)
    states = [_visible(x, K)] if trace else []
    every = _trace_every(len(steps))
    for i, (t, s) in enumerate(steps):
        log_x0 = predict(x, t)
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        log_p = diffusion.posterior(log_x0, x, tt, torch.full_like(tt, s))
        x = categorical(generators, _probs(log_p))
        if trace and ((i + 1) % every == 0 or i + 1 == len(steps)):
            states.append(_visible(x, K))
    return x, states


@torch.no_grad()
def reverse_fixed_budget(diffusion, predict, num_tokens: int, generators, steps, reveal_per_call: int = 0,
                         purity: bool = False, purity_weight: float = 0.0, trace: bool = False, device="cpu"):
    """-> (codes [B, N], states) like reverse_posterior; see the module docstring for the schedule."""
    B, K, N = len(generators), diffusion.K, num_tokens
    gbar = diffusion.gbar.double().cpu()
    g_last = float(gbar[steps[0][0]])
    x = torch.full((B, N), K, dtype=torch.long, device=device)
    states = [_visible(x, K)] if trace else []
    every = _trace_every(len(steps))
    revealed = 0
    for i, (t, s) in enumerate(steps):
        target = N if s == 0 else int(round(N * (g_last - float(gbar[s])) / g_last))
        while revealed < target:
            log_p = predict(x, t)[..., :K]  # [B, N, K]
            score = torch.ones(B, N, dtype=torch.float64, device=device)
            if purity:
                score = log_p.exp().amax(-1).clamp(0, 1)
                score = score / (score.amax(1, keepdim=True) + 1e-10)
            n = target - revealed
            if reveal_per_call > 0:
                n = min(n, reveal_per_call)
            masked = x == K
            weight = torch.where(masked, score.clamp_min(1e-30), torch.zeros_like(score))
            u = rand(generators, N, device=device, dtype=torch.float64).clamp(1e-30, 1 - 1e-16)
            keys = weight.log() - torch.log(-torch.log(u))  # Gumbel top-n = draws without replacement
            chosen = keys.topk(n, dim=1).indices  # [B, n]
            if purity and purity_weight > 0:
                log_p = torch.log_softmax((1 + purity_weight * score)[..., None] * log_p, dim=-1)
            values = categorical(generators, _probs(log_p))  # [B, N]
            x = x.scatter(1, chosen, values.gather(1, chosen))
            revealed += n
        if trace and ((i + 1) % every == 0 or i + 1 == len(steps)):
            states.append(_visible(x, K))
    return x, states
