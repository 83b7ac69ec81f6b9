"""The RQ-Transformer sampling loop: cells in raster order, and inside each cell its D codes, depth by depth.

The model provides (models.priors.rqtransformer.RQTransformer)

    model.new_kv_caches() -> (spatial caches, depth caches)
    model.next_context(prefix, codes, caches)          context [R, dim] of the next cell given the condition
                                                       prefix [R, L, dim] and the codes of earlier cells
                                                       [R, t, D]; with caches only uncached cells are run
    model.next_depth_logits(context, codes, caches)    logits [R, K] of the next depth of the cell given its
                                                       codes so far [R, d]

Temperature, top-k and top-p are per depth (lists of D values). With guidance the rows are [cond; uncond];
both halves append the same drawn code. Row b draws only from generators[b] (samplers.rng.categorical).
"""

import torch

from samplers.logits import cfg_combine, cfg_scale_at, process_logits
from samplers.rng import categorical


@torch.no_grad()
def sample_rq(
    model,
    prefix: torch.Tensor,
    null_prefix: torch.Tensor | None,
    generators: list[torch.Generator],
    *,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    cfg: float = 1.0,
    cfg_schedule: str = "constant",
    use_kv_cache: bool = True,
    trace_every: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw codes [B, T, D] for the B = len(generators) rows; prefix [B, L, dim] (null_prefix: guidance rows).

    With trace_every = k > 0, also returns [B, T, D] snapshots (-1 = not generated): the empty one, one
    after every k cells, and always the complete one last.
    """
    B = len(generators)
    if prefix.shape[0] != B:
        raise ValueError(f"{prefix.shape[0]} condition rows for {B} generators")
    T, D = model.num_positions, model.depth
    guided = cfg != 1.0 and null_prefix is not None
    rows = torch.cat([prefix, null_prefix]) if guided else prefix
    spatial_caches, depth_caches = model.new_kv_caches() if use_kv_cache else (None, None)
    codes = torch.zeros(rows.shape[0], 0, D, dtype=torch.long, device=rows.device)
    states = [torch.full((B, T, D), -1, dtype=torch.long, device=rows.device)] if trace_every else []
    for t in range(T):
        context = model.next_context(rows, codes, spatial_caches)  # [R, dim]
        scale = cfg_scale_at(t, T, cfg, cfg_schedule)
        cell = torch.zeros(rows.shape[0], 0, dtype=torch.long, device=rows.device)
        if depth_caches is not None:
            for cache in depth_caches:
                cache.reset()
        for d in range(D):
            logits = model.next_depth_logits(context, cell, depth_caches).float()
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = cfg_combine(cond_logits, uncond_logits, scale)
            probs = process_logits(logits, temperature[d], top_k[d], top_p[d])
            drawn = categorical(generators, probs)  # [B]
            cell = torch.cat([cell, drawn.repeat(2 if guided else 1)[:, None]], dim=1)
        codes = torch.cat([codes, cell[:, None]], dim=1)
        if trace_every and ((t + 1) % trace_every == 0 or t + 1 == T):
            state = torch.full((B, T, D), -1, dtype=torch.long, device=rows.device)
            state[:, : t + 1] = codes[:B]
            states.append(state)
    return codes[:B], states
