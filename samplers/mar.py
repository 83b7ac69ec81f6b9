"""The MAR sampling loop: reveal tokens in a random order, a cosine-scheduled number per iteration, each one drawn
by the diffusion head from the transformer's condition vector for it.

The model is anything with ``seq_len``, ``token_dim``, ``token_conditions(x, mask, class_vec) -> z [B, N, D]``
and ``diffloss.sample(z, generators, num_steps, temperature, cfg) -> [B, k, token_dim]``.

Per iteration k = 0 .. num_iter-1 (N tokens, all unknown at the start; `unknown` counts them before the step):
    unknown_after = floor(N cos(pi/2 (k+1)/num_iter)), clamped to [1, unknown - 1]; 0 after the last iteration
    the tokens to draw now are those at order positions [unknown_after, unknown): the same count in every row
    linear CFG: scale = 1 + (cfg - 1) * (N - unknown_after) / N
The published linear schedule uses the clamped count (>= 1) at the last step too, so it stops at
1 + (cfg - 1)(N - 1)/N and never reaches cfg; here the last iteration, which reveals everything left, uses cfg
itself. Otherwise the two agree step for step.

Randomness: row b's order and all its diffusion noise come from generators[b] (samplers.rng), and every row draws
the same number of values at every iteration, so a sample does not depend on the rest of its batch.
"""

import math

import torch

from engine.errors import TesseraError
from samplers.rng import rand


def cosine_unknown_counts(num_tokens: int, num_iter: int) -> list[int]:
    """Tokens still unknown after each of the num_iter iterations (the last is always 0)."""
    out, unknown = [], num_tokens
    for k in range(num_iter):
        if k == num_iter - 1:
            nxt = 0
        else:
            nxt = max(1, min(unknown - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iter))))
        out.append(nxt)
        unknown = nxt
    return out


def mar_cfg_scale(cfg: float, schedule: str, num_tokens: int, unknown_after: int) -> float:
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return 1.0 + (float(cfg) - 1.0) * (num_tokens - unknown_after) / num_tokens
    raise TesseraError(f"cfg_schedule='{schedule}' is not one of: constant, linear")


@torch.no_grad()
def sample_mar(model, class_vec: torch.Tensor, null_vec: torch.Tensor | None, generators: list[torch.Generator], *,
               num_iter: int, num_sampling_steps: int = 100, temperature: float = 1.0, cfg: float = 1.0,
               cfg_schedule: str = "constant", clip_denoised: float = 0.0, trace: bool = False
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-> (tokens [B, N, token_dim], states). class_vec [B, D]; null_vec [B, D] for guidance (None: no CFG).

    states (with trace): [B, N, token_dim] after each iteration, NaN where not generated yet, the blank one first.
    """
    B, N, C = len(generators), model.seq_len, model.token_dim
    device = class_vec.device
    guided = cfg != 1.0 and null_vec is not None
    rank = rand(generators, N, device=device).argsort(1).argsort(1)  # [B, N] place of each token in its order
    tokens = torch.zeros(B, N, C, device=device, dtype=class_vec.dtype)
    unknown = torch.ones(B, N, dtype=torch.bool, device=device)
    conds = torch.cat([class_vec, null_vec]) if guided else class_vec
    states = [torch.full_like(tokens, float("nan"))] if trace else []
    for unknown_after in cosine_unknown_counts(N, num_iter):
        pred = unknown & (rank >= unknown_after)  # [B, N]: the tokens drawn now
        k = int(pred[0].sum())
        if k:
            x, m = (torch.cat([tokens, tokens]), torch.cat([unknown, unknown])) if guided else (tokens, unknown)
            z = model.token_conditions(x, m, conds)
            z = z[torch.cat([pred, pred]) if guided else pred].reshape(z.shape[0], k, -1)
            scale = mar_cfg_scale(cfg, cfg_schedule, N, unknown_after) if guided else 1.0
            new = model.diffloss.sample(z, generators, num_sampling_steps, temperature, scale, clip_denoised)
            tokens[pred] = new.reshape(B * k, C).to(tokens.dtype)
        unknown = unknown & ~pred
        if trace:
            states.append(tokens.masked_fill(unknown[..., None], float("nan")))
    return tokens, states
