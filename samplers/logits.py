"""Sampling controls shared by every prior: temperature, top-k, top-p, classifier-free guidance.

Order inside ``process_logits``: temperature -> top-k -> top-p -> softmax. Logits are [..., V]; filtered
entries become -inf (probability 0).
"""

import math

import torch

from engine.errors import TesseraError

SAMPLING_DEFAULTS = dict(
    temperature=1.0,  # logits / temperature; > 0
    top_k=0,  # keep the k most likely tokens; 0 = off
    top_p=1.0,  # nucleus: keep the smallest set whose probability reaches top_p; 1 = off
    cfg=1.0,  # classifier-free guidance scale; 1 = off (no unconditional pass)
    cfg_schedule="constant",  # constant | linear (scale grows to cfg over the generation, see cfg_scale_at)
    use_kv_cache=True,  # autoregressive priors: cache keys/values instead of re-running the prefix
    rejection_n=1,  # best-of-n rejection sampling, handled by the sampling entry point
)
CFG_SCHEDULES = ("constant", "linear")


def check_sampling_kwargs(kwargs: dict, extra: dict | None = None) -> dict:
    """Merge ``kwargs`` over SAMPLING_DEFAULTS (plus a prior's own ``extra`` defaults) and check the values.

    An unknown key or a value out of range raises TesseraError naming it.
    """
    defaults = {**SAMPLING_DEFAULTS, **(extra or {})}
    for key in kwargs:
        if key not in defaults:
            raise TesseraError(f"unknown sampling option '{key}'; known: {', '.join(defaults)}")
    s = {**defaults, **kwargs}
    try:
        _check_values(s)
    except (TypeError, ValueError) as e:
        raise TesseraError(f"bad sampling option value ({e}); see samplers.logits.SAMPLING_DEFAULTS") from e
    s["top_k"], s["rejection_n"] = int(s["top_k"]), int(s["rejection_n"])
    s["temperature"], s["top_p"], s["cfg"] = float(s["temperature"]), float(s["top_p"]), float(s["cfg"])
    s["use_kv_cache"] = bool(s["use_kv_cache"])
    return s


def _check_values(s: dict) -> None:
    if not float(s["temperature"]) > 0:
        raise TesseraError(f"sampling temperature={s['temperature']} must be > 0")
    if int(s["top_k"]) != s["top_k"] or s["top_k"] < 0:
        raise TesseraError(f"sampling top_k={s['top_k']} must be an integer >= 0 (0 = off)")
    if not 0 < float(s["top_p"]) <= 1:
        raise TesseraError(f"sampling top_p={s['top_p']} must be in (0, 1] (1 = off)")
    if not float(s["cfg"]) >= 0 or not math.isfinite(float(s["cfg"])):
        raise TesseraError(f"sampling cfg={s['cfg']} must be a finite scale >= 0 (1 = off)")
    if s["cfg_schedule"] not in CFG_SCHEDULES:
        raise TesseraError(
            f"sampling cfg_schedule='{s['cfg_schedule']}' is not one of: {', '.join(CFG_SCHEDULES)}"
        )
    if int(s["rejection_n"]) != s["rejection_n"] or s["rejection_n"] < 1:
        raise TesseraError(f"sampling rejection_n={s['rejection_n']} must be an integer >= 1")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (temperature > 0)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of the last dim, set the rest to -inf; k <= 0 or k >= V is a no-op.

    Entries tied with the k-th largest value are all kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.

    Sorted by probability p_1 >= p_2 >= ..., token i is kept iff p_1 + ... + p_{i-1} < p, so the most likely
    token is always kept; p >= 1 is a no-op.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cfg_combine(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond); scale 1 returns cond."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def cfg_scale_at(step: int, num_steps: int, cfg: float, schedule: str = "constant") -> float:
    """Guidance scale at generation step ``step`` of ``num_steps`` (0-based).

    constant: ``cfg`` at every step.
    linear:   1 + (cfg - 1) * (step + 1) / num_steps, i.e. 1 + (cfg - 1) / num_steps on the first step,
              growing linearly to exactly ``cfg`` on the last step (step = num_steps - 1).
    """
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return 1.0 + (float(cfg) - 1.0) * (step + 1) / num_steps
    raise TesseraError(f"cfg_schedule='{schedule}' is not one of: {', '.join(CFG_SCHEDULES)}")


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logits [..., V] -> float32 probabilities [..., V] after temperature, top-k and top-p."""
    logits = apply_temperature(logits.float(), temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return logits.softmax(-1)
