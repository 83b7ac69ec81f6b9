"""CLIP score: how well generated images match their captions, by the cosine similarity of their CLIP
ViT-B/32 image and text embeddings.

    clip_score = mean_i 100 * max(cos(E_img(x_i), E_txt(c_i)), 0)        (also reported: the raw mean cosine)

Images enter as uint8 (0..255; NHWC or NCHW) or as float tensors in tessera's [-1, 1]; both are mapped to
[0, 1] before CLIP's own preprocessing (bicubic resize of the short side to 224, centre crop, CLIP mean/std).
Feeding [-1, 1] tensors to a pipeline that expects [0, 1] silently lowers the score: the conversion
happens here, once, for every input type.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import TesseraError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def to_unit_range(images) -> torch.Tensor:
    """uint8 [B, H, W, 3] / [B, 3, H, W] (0..255) or float [B, 3, H, W] in [-1, 1] -> float [B, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim != 4:
        raise TesseraError(f"CLIP score expects a batch of images [B, H, W, 3] or [B, 3, H, W], got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TesseraError(f"CLIP score images must be uint8 or float in [-1, 1], got {x.dtype}")
    return ((x.float() + 1) / 2).clamp(0, 1)


def clip_preprocess(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP input [B, 3, 224, 224] (short side to 224 bicubic, centre crop, normalise)."""
    h, w = x.shape[-2:]
    scale = CLIP_SIZE / min(h, w)
    size = (max(CLIP_SIZE, round(h * scale)), max(CLIP_SIZE, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - CLIP_SIZE) // 2, (size[1] - CLIP_SIZE) // 2
    x = x[..., top : top + CLIP_SIZE, left : left + CLIP_SIZE]
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def clip_score(model, images, captions: list[str], batch_size: int = 64) -> dict:
    """model: an open_clip CLIP (models.conditioners.build_clip) ->
    {"clip_score", "clip_cosine", "num_pairs", "per_pair": the cosine of every (image, caption) pair}."""
    import open_clip

    if len(images) != len(captions):
        raise TesseraError(f"CLIP score got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise TesseraError("CLIP score got no images")
    device = next(model.parameters()).device
    cosines = []
    for start in range(0, len(images), batch_size):
        x = clip_preprocess(to_unit_range(images[start : start + batch_size]).to(device))
        tokens = open_clip.tokenize(list(captions[start : start + batch_size])).to(device)
        img = F.normalize(model.encode_image(x).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        cosines.append((img * txt).sum(-1).cpu())
    cos = torch.cat(cosines).double()
    return {"clip_score": float(100 * cos.clamp_min(0).mean()), "clip_cosine": float(cos.mean()),
            "num_pairs": int(cos.numel()), "per_pair": cos.tolist()}


def read_captions(path, n: int) -> list[str]:
    """Captions for samples 0..n-1 from a .txt (one a line) or .jsonl ({"caption": ...}); sample i takes
    caption i mod count, as main_sample.py --captions assigns them."""
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"captions file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(ln)["caption"] for ln in lines]
        except (ValueError, KeyError, TypeError) as e:
            raise TesseraError(f"{path}: every line must be a JSON object with a 'caption' ({e})") from e
    if not lines:
        raise TesseraError(f"no captions in {path}")
    return [lines[i % len(lines)] for i in range(n)]


def clip_score_of(samples, captions_file, clip_weights=None, device="cpu", batch_size: int = 64,
                  allow_random: bool = False) -> dict:
    """CLIP score of a sample source (folder, ADM .npz, ...; see metrics.inputs) against a captions file."""
    from metrics.inputs import open_images
    from models.conditioners import build_clip

    if captions_file is None:
        raise TesseraError("the CLIP score needs --captions FILE (the captions the samples were generated from)")
    source = open_images(samples)
    captions = read_captions(captions_file, len(source))
    model = build_clip(clip_weights, allow_random=allow_random).to(device)
    out = clip_score(model, source.read_all(), captions, batch_size=batch_size)
    out.pop("per_pair")
    return out
