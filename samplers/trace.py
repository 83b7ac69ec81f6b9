"""Decoding GIF: decode every partial state of a sampling trace, grey out what is not generated yet, animate.

A state is a batch of partial token grids, in one of two forms:
  integer [B, h, w] or [B, h, w, depth]: code ids, -1 where not generated (a cell is filled when all its
          depth codes are >= 0);
  float   [B, C, h, w]: continuous latents, NaN where not generated.
Unfilled entries are replaced by 0 for decoding; the pixels of unfilled cells are then painted light grey.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import TesseraError

BLANK_GREY = 0.85  # in [0, 1]: the colour of cells that are not generated yet
LAST_FRAME_HOLD = 2.0  # seconds the final frame stays before the loop restarts


def fill_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial state -> (decodable tokens of the same shape, filled-cell mask bool [B, h, w])."""
    if state.is_floating_point():
        missing = torch.isnan(state)
        return state.masked_fill(missing, 0.0), ~missing.any(dim=1)
    missing = state < 0
    filled = ~missing if state.dim() == 3 else ~missing.flatten(3).any(-1)
    return state.clamp_min(0), filled


def tile(images: np.ndarray, grid: bool = True, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one [rows*(H+pad)-pad, cols*(W+pad)-pad, 3] image (white gutters).

    grid=True: ceil(sqrt(B)) columns; grid=False: one row.
    """
    B, H, W, _ = images.shape
    cols = int(np.ceil(np.sqrt(B))) if grid else B
    rows = int(np.ceil(B / cols))
    out = np.full((rows * (H + pad) - pad, cols * (W + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        out[r * (H + pad) : r * (H + pad) + H, c * (W + pad) : c * (W + pad) + W] = images[i]
    return out


@torch.no_grad()
def decode_frames(states: list[torch.Tensor], decode_fn, grid: bool = True) -> list[np.ndarray]:
    """Each state -> one uint8 [H', W', 3] frame: decode_fn(tokens) -> images [B, 3, H, W] in [-1, 1]."""
    frames = []
    for state in states:
        tokens, filled = fill_state(state)
        images = ((decode_fn(tokens).float().clamp(-1, 1) + 1) / 2).cpu()
        mask = F.interpolate(filled[:, None].float().cpu(), size=images.shape[-2:], mode="nearest")
        images = images * mask + BLANK_GREY * (1 - mask)
        arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        frames.append(tile(arr, grid))
    return frames


def decoding_gif(states: list[torch.Tensor], decode_fn, path, fps: float = 8.0, grid: bool = True) -> Path:
    """Write an animated GIF of the decoding to ``path``: one frame per state, the last one held longer.

    states: the trace a prior's ``sample(..., trace=True)`` returns. decode_fn: tokens -> images [B, 3, H, W]
    in [-1, 1] (e.g. tokenizer.decode). Returns the path written.
    """
    if not states:
        raise TesseraError("decoding_gif got no states; sample with trace=True to record them")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(f) for f in decode_frames(states, decode_fn, grid)]
    step_ms = int(round(1000 / fps))
    durations = [step_ms] * (len(frames) - 1) + [int(LAST_FRAME_HOLD * 1000)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)
    return path
