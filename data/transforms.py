"""Image <-> tensor conversions shared by every data set and by sampling: tensors live in [-1, 1]."""

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM centre crop: PIL image -> uint8 [image_size, image_size, C].

    Halve with a box filter while the short side is at least twice the target (cheap, alias-free), then one
    bicubic resize that brings the short side to `image_size`, then cut the central square.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    size = tuple(round(side * scale) for side in pil_image.size)
    pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    array = np.asarray(pil_image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageTransform:
    """PIL image -> float32 [3, resolution, resolution] in [-1, 1]: RGB, ADM centre crop, optional flip.

    The flip coin comes from torch's global generator, which the DataLoader seeds per worker. Call
    `transform(image, flip=True/False)` to force the choice (caption data sets do, to mirror the words).
    """

    def __init__(self, resolution: int, random_flip: bool):
        self.resolution, self.random_flip = int(resolution), bool(random_flip)

    def draw_flip(self) -> bool:
        return self.random_flip and bool(torch.rand(()) < 0.5)

    def __call__(self, image: Image.Image, flip: bool | None = None) -> torch.Tensor:
        array = center_crop_arr(image.convert("RGB"), self.resolution)
        if self.draw_flip() if flip is None else flip:
            array = array[:, ::-1]
        return to_tensor(array)

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, random_flip={self.random_flip})"


def build_transform(resolution: int, random_flip: bool) -> ImageTransform:
    """PIL image -> float32 [3, resolution, resolution] in [-1, 1]."""
    return ImageTransform(resolution, random_flip)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] or [3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] or [H, W, 3] (rounded, clipped)."""
    x = x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """[3, H, W] in [-1, 1] -> one PIL image; [B, 3, H, W] -> a list of them."""
    array = to_uint8(x)
    return Image.fromarray(array) if array.ndim == 3 else [Image.fromarray(a) for a in array]
