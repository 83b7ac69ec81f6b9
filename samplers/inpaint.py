"""Inpainting inputs: an image and a pixel mask -> the known codes and the known-cell mask of a token grid.

Mask images: white (>= 128 after conversion to grey) = known pixel, black = hole to fill. Both files are
resized (shorter side) and centre-cropped to the tokenizer's resolution, the mask with nearest-neighbour.
A latent cell is known only if every pixel of its f x f footprint is known (f = resolution / grid side), so
a cell the hole touches at all is regenerated.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import TesseraError


def _open(path, mode: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"inpainting file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except OSError as e:
        raise TesseraError(f"cannot read image {path} ({e}); pass a PNG or JPEG file") from e


def _fit(im: Image.Image, resolution: int, resample) -> Image.Image:
    """Resize the shorter side to ``resolution`` and centre-crop to a square."""
    w, h = im.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return im


def load_inpaint_inputs(image_path, mask_path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image [1, 3, R, R] in [-1, 1], known pixels bool [1, R, R])."""
    image = _fit(_open(image_path, "RGB"), resolution, Image.BICUBIC)
    mask = _fit(_open(mask_path, "L"), resolution, Image.NEAREST)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    known = torch.from_numpy(np.asarray(mask) >= 128)[None]
    if not known.any():
        raise TesseraError(f"mask {mask_path} marks no pixel as known (white = known, black = hole)")
    return x, known


def known_cells(known_pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """known pixels bool [B, H, W] -> known cells bool [B, h, w]: a cell is known iff its whole patch is."""
    B, H, W = known_pixels.shape
    h, w = grid
    if H % h or W % w or H // h != W // w:
        raise TesseraError(f"a {H}x{W} mask does not tile into the {h}x{w} token grid with square patches")
    holes = (~known_pixels).float()[:, None]
    return F.max_pool2d(holes, kernel_size=H // h)[:, 0] == 0


@torch.no_grad()
def inpaint_inputs(tokenizer, image_path, mask_path, device) -> dict:
    """Encode the image and map the mask to the token grid: {"known_tokens", "known_mask", "image", "known_pixels"}.

    known_tokens has the tokenizer's token layout with batch 1 ([1, h, w] or [1, h, w, depth]); known_mask is
    bool [1, h, w]. Expand both to the batch before passing them to a prior's ``sample``.
    """
    resolution = int(getattr(tokenizer, "resolution", 0) or 0)
    if resolution <= 0:
        raise TesseraError("inpainting needs a tokenizer with a fixed image resolution")
    x, known = load_inpaint_inputs(image_path, mask_path, resolution)
    x, known = x.to(device), known.to(device)
    tokens = tokenizer.encode(x)
    grid = tuple(tokenizer.token_shape[:2])
    return {"known_tokens": tokens, "known_mask": known_cells(known, grid), "image": x, "known_pixels": known}
