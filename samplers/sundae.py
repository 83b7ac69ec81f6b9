"""The SUNDAE sampling loop: start from uniform random codes and repeatedly resample a proportion of them.

Step k of ``steps`` (0-based), for every sample still running:

    probs    = softmax(logits(state) / temperature_k)         (then top-k / top-p, see samplers.logits)
    proposal ~ probs, independently per position
    update   = uniform < proportion_k, and the position is not known (inpainting)
    state    = where(update, proposal, state)

temperature_k and proportion_k are linear from their start to their end value over the nominal ``steps``:
the first step uses exactly the start value, the last step exactly the end value (``linear_schedule``).
A sample stops early once it has run at least ``min_steps`` steps and a step changed none of its codes; a
stopped sample is frozen and leaves the batch. Known positions (inpainting) start from the known codes and
never change; every other position starts from a uniform random code.

Randomness: row b draws only from generators[b] (samplers.rng): its start codes, then per step one uniform
per position for the proposal and one per position for the update mask. Stopped rows draw nothing more, so
a sample does not depend on the batch it runs in.
"""

from dataclasses import dataclass, field

import torch

from engine.errors import TesseraError
from samplers.logits import process_logits
from samplers.rng import categorical, rand, randint

SUNDAE_SAMPLING_DEFAULTS = dict(
    steps=100,  # nominal number of steps: the schedules span it and it caps every sample
    temperature_end=None,  # temperature on the last step; None = the start value (a constant schedule)
    proportion=0.5,  # probability that a position takes its proposal on the first step
    proportion_end=None,  # ... on the last step; None = the start value
    min_steps=10,  # a sample may stop early only after running at least this many steps
    early_stop=True,  # stop a sample when a step changes none of its codes
)


def linear_schedule(start: float, end: float, steps: int) -> list[float]:
    """start * (1 - t) + end * t at t = k / (steps - 1), k = 0 .. steps - 1: exactly start first, exactly end last.

    One step uses the end value.
    """
    if steps == 1:
        return [float(end)]
    return [start * (1 - k / (steps - 1)) + end * (k / (steps - 1)) for k in range(steps)]


def sundae_options(s: dict) -> dict:
    """Check and normalise the SUNDAE options of merged sampling settings ``s`` (end values filled in)."""
    out = dict(s)
    try:
        steps, min_steps = int(s["steps"]), int(s["min_steps"])
        if steps != s["steps"] or steps < 1:
            raise TesseraError(f"sampling steps={s['steps']} must be an integer >= 1")
        if min_steps != s["min_steps"] or min_steps < 0:
            raise TesseraError(f"sampling min_steps={s['min_steps']} must be an integer >= 0")
        t_end = s["temperature"] if s["temperature_end"] is None else float(s["temperature_end"])
        p_start = float(s["proportion"])
        p_end = p_start if s["proportion_end"] is None else float(s["proportion_end"])
    except (TypeError, ValueError) as e:
        raise TesseraError(f"bad SUNDAE sampling option ({e}); see samplers.sundae.SUNDAE_SAMPLING_DEFAULTS") from e
    if not t_end > 0:
        raise TesseraError(f"sampling temperature_end={t_end} must be > 0")
    for name, p in (("proportion", p_start), ("proportion_end", p_end)):
        if not 0.0 <= p <= 1.0:
            raise TesseraError(f"sampling {name}={p} must be in [0, 1]")
    if not isinstance(s["early_stop"], bool):
        raise TesseraError(f"sampling early_stop={s['early_stop']!r} must be true or false")
    out.update(steps=steps, min_steps=min_steps, temperature_end=float(t_end), proportion=p_start,
               proportion_end=p_end)
    return out


@dataclass
class SundaeResult:
    """codes [B, N]; steps_run [B] (steps each sample ran before stopping or reaching ``steps``);
    states: with trace, [B, N] after every step, the start state first (stopped rows stay frozen);
    temperatures / proportions: the schedule values of the steps that ran."""

    codes: torch.Tensor
    steps_run: torch.Tensor
    states: list[torch.Tensor] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    proportions: list[float] = field(default_factory=list)


@torch.no_grad()
def sample_sundae(
    logits_fn,
    generators: list[torch.Generator],
    num_tokens: int,
    codebook_size: int,
    *,
    steps: int,
    temperature: float,
    temperature_end: float,
    proportion: float,
    proportion_end: float,
    min_steps: int,
    early_stop: bool,
    top_k: int = 0,
    top_p: float = 1.0,
    known_codes: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    device="cpu",
    trace: bool = False,
) -> SundaeResult:
    """Run the loop for B = len(generators) samples of ``num_tokens`` codes.

    logits_fn(codes [A, N], rows LongTensor [A], step) -> logits [A, N, V] for the A running rows (``rows``
    index the batch, e.g. to pick their class ids). known_codes [B, N] / known_mask bool [B, N]: inpainting.
    """
    B = len(generators)
    state = randint(generators, codebook_size, num_tokens, device=device)
    if known_mask is not None:
        if known_codes is None or known_mask.shape != (B, num_tokens) or known_codes.shape != (B, num_tokens):
            raise TesseraError(f"inpainting needs known codes and a known mask of shape [{B}, {num_tokens}]")
        known_mask = known_mask.to(device=device, dtype=torch.bool)
        state = torch.where(known_mask, known_codes.to(device), state)
    temperatures = linear_schedule(temperature, temperature_end, steps)
    proportions = linear_schedule(proportion, proportion_end, steps)
    rows = torch.arange(B, device=device)
    steps_run = torch.zeros(B, dtype=torch.long, device=device)
    states = [state.clone()] if trace else []
    ran = 0
    for k in range(steps):
        if rows.numel() == 0:
            break
        ran = k + 1
        gens = [generators[i] for i in rows.tolist()]
        current = state[rows]
        probs = process_logits(logits_fn(current, rows, k).float(), temperatures[k], top_k, top_p)
        proposal = categorical(gens, probs)
        update = rand(gens, num_tokens, device=device) < proportions[k]
        if known_mask is not None:
            update &= ~known_mask[rows]
        new = torch.where(update, proposal, current)
        state[rows] = new
        steps_run[rows] += 1
        if early_stop and k + 1 >= min_steps:
            rows = rows[(new != current).any(dim=1)]
        if trace:
            states.append(state.clone())
    return SundaeResult(state, steps_run, states, temperatures[:ran], proportions[:ran])
