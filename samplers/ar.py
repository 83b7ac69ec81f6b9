"""The autoregressive sampling loop: one token per step, with or without a KV cache, CFG in one doubled batch.

The model is anything with

    model.new_kv_caches() -> list[KVCache]           one per attention layer (used with use_kv_cache)
    model.next_logits(cond_ids, codes, caches)       logits [R, V] of the next token given condition ids [R]
                                                     and the codes so far [R, t]; with caches only the
                                                     positions not cached yet are run, with caches=None the
                                                     whole prefix is re-run.

Row b draws only from generators[b] (samplers.rng.categorical): a sample does not depend on its batch.
With guidance the batch is [cond rows; uncond rows]; both halves append the same drawn token.
"""

import torch

from samplers.logits import cfg_combine, cfg_scale_at, process_logits
from samplers.rng import categorical


@torch.no_grad()
def sample_autoregressive(
    model,
    cond_ids: torch.Tensor,
    null_ids: torch.Tensor | None,
    num_tokens: int,
    generators: list[torch.Generator],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg: float = 1.0,
    cfg_schedule: str = "constant",
    use_kv_cache: bool = True,
    trace_every: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw ``num_tokens`` codes for each of the B = len(generators) rows.

    cond_ids [B] condition ids; null_ids [B] the unconditional ids used when cfg != 1 (None: no guidance).
    Returns (codes [B, num_tokens], states): with trace_every = k > 0, states holds [B, num_tokens] snapshots
    (-1 = not generated yet), the empty one first, then one every k tokens, and always the complete one last.
    """
    B = len(generators)
    if cond_ids.shape[0] != B:
        raise ValueError(f"{cond_ids.shape[0]} condition ids for {B} generators")
    guided = cfg != 1.0 and null_ids is not None
    ids = torch.cat([cond_ids, null_ids]) if guided else cond_ids
    caches = model.new_kv_caches() if use_kv_cache else None
    codes = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
    states = []
    if trace_every:
        states.append(torch.full((B, num_tokens), -1, dtype=torch.long, device=ids.device))
    for t in range(num_tokens):
        logits = model.next_logits(ids, codes, caches).float()
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = cfg_combine(cond_logits, uncond_logits, cfg_scale_at(t, num_tokens, cfg, cfg_schedule))
        probs = process_logits(logits, temperature, top_k, top_p)
        nxt = categorical(generators, probs)  # [B]
        codes = torch.cat([codes, nxt.repeat(2 if guided else 1)[:, None]], dim=1)
        if trace_every and ((t + 1) % trace_every == 0 or t + 1 == num_tokens):
            state = torch.full((B, num_tokens), -1, dtype=torch.long, device=ids.device)
            state[:, : t + 1] = codes[:B]
            states.append(state)
    return codes[:B], states
