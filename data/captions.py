"""Image-caption pairs for text-conditional priors: one reader per caption-file format.

A reader turns a caption file into a list of `{"file": path relative to the image root, "caption": str}`
records (extra keys are kept). `CaptionDataset` pairs each record with its decoded image.
"""

import json
import re
from pathlib import Path

import torch

from data.folders import open_rgb
from data.transforms import build_transform
from engine.errors import TesseraError


def read_shapes_captions(captions_file: Path) -> list[dict]:
    """The shapes `captions.jsonl`: one `{"file", "label", "caption"}` object a line."""
    records = []
    with open(captions_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record.get("file"), str) or not isinstance(record.get("caption"), str):
                    raise ValueError("needs string fields 'file' and 'caption'")
            except (ValueError, AttributeError) as e:
                raise TesseraError(f"{captions_file}:{number} is not a shapes caption record ({e}): "
                                   "regenerate the file or fix that line") from e
            records.append(record)
    return records


CAPTION_READERS = {"shapes": read_shapes_captions}

_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def mirror_caption(caption: str) -> str:
    """The caption of the horizontally flipped image: left and right trade places."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


class CaptionDataset(torch.utils.data.Dataset):
    """(image float32 [3, resolution, resolution] in [-1, 1], caption str) pairs, in caption-file order.

    With random_flip the caption is mirrored together with the image, since captions may name a side.
    """

    def __init__(self, image_root, captions_file, resolution: int, random_flip: bool = False,
                 format: str = "shapes"):
        self.image_root, self.captions_file = Path(image_root).expanduser(), Path(captions_file).expanduser()
        if format not in CAPTION_READERS:
            raise TesseraError(f"unknown caption format {format!r}: choose one of {sorted(CAPTION_READERS)}")
        if not self.image_root.is_dir():
            raise TesseraError(f"image root {self.image_root} does not exist: expected the directory that "
                               f"the 'file' paths in {self.captions_file} are relative to")
        if not self.captions_file.is_file():
            raise TesseraError(f"caption file {self.captions_file} does not exist: "
                               f"expected a {format} caption file")
        self.records = CAPTION_READERS[format](self.captions_file)
        if not self.records:
            raise TesseraError(f"caption file {self.captions_file} holds no captions")
        self.transform = build_transform(resolution, random_flip)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        record = self.records[index]
        path = self.image_root / record["file"]
        flip = self.transform.draw_flip()
        image = self.transform(open_rgb(path, str(path)), flip=flip)
        return image, mirror_caption(record["caption"]) if flip else record["caption"]
