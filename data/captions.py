"""Image-caption pairs for text-conditional priors: one reader per caption-file format.

A reader turns a caption file into a list of `{"file": path relative to the image root, "caption": str}`
records (extra keys are kept): shapes `captions.jsonl`, a COCO captions json, a CUB-200 text folder, a
Conceptual-Captions style tsv. Images with several captions give one record per caption.
`CaptionDataset` pairs each record with its decoded image; `CaptionTrainingSet` is what prior training
iterates over (flips as extra items, images or cached tokens).
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


def read_coco_captions(captions_file: Path) -> list[dict]:
    """A COCO captions json (`images` with `id`/`file_name`, `annotations` with `image_id`/`caption`): one
    record per caption (about 5 per image), ordered by file name, then annotation id."""
    try:
        data = json.loads(Path(captions_file).read_text())
        files = {image["id"]: image["file_name"] for image in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: (files[a["image_id"]], a.get("id", 0)))
    except (ValueError, KeyError, TypeError) as e:
        raise TesseraError(f"{captions_file} is not a COCO captions json ({type(e).__name__}: {e}); expected "
                           "annotations/captions_<split>2014.json or 2017.json") from e
    return [{"file": files[a["image_id"]], "caption": " ".join(str(a["caption"]).split())} for a in annotations]


def read_cub_captions(text_dir: Path, image_suffix: str = ".jpg") -> list[dict]:
    """A CUB-200 text folder (`<class>/<image>.txt`, one caption a line, as in the published birds/text):
    one record per caption, the image at `<class>/<image>.jpg` under the image root, sorted by path."""
    text_dir = Path(text_dir)
    if not text_dir.is_dir():
        raise TesseraError(f"CUB text folder {text_dir} does not exist: expected <class>/<image>.txt files")
    records = []
    for txt in sorted(text_dir.rglob("*.txt"), key=lambda p: p.relative_to(text_dir).as_posix()):
        file = txt.relative_to(text_dir).with_suffix(image_suffix).as_posix()
        for line in txt.read_text(errors="replace").splitlines():
            if line.strip():
                records.append({"file": file, "caption": " ".join(line.split())})
    return records


def read_tsv_captions(tsv_file: Path) -> list[dict]:
    """A Conceptual-Captions style tsv, `caption<TAB>file` a line (file relative to the image root), in file
    order. A first line `caption<TAB>file` (or `caption<TAB>filepath`/`url`) is taken as a header."""
    records = []
    with open(tsv_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise TesseraError(f"{tsv_file}:{number} has no tab: expected caption<TAB>file")
            caption, file = parts[0].strip(), parts[1].strip()
            if number == 1 and caption.lower() == "caption":
                continue
            records.append({"file": file, "caption": caption})
    return records


CAPTION_READERS = {"shapes": read_shapes_captions, "coco": read_coco_captions, "cub": read_cub_captions,
                   "tsv": read_tsv_captions}

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
        if not self.captions_file.exists():
            raise TesseraError(f"caption file {self.captions_file} does not exist: "
                               f"expected a {format} caption file")
        self.records = CAPTION_READERS[format](self.captions_file)
        if not self.records:
            raise TesseraError(f"caption file {self.captions_file} holds no captions")
        self.transform = build_transform(resolution, random_flip)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int, flip: bool = False) -> torch.Tensor:
        """The image of record `index`, [3, resolution, resolution] in [-1, 1] (mirrored when flip)."""
        path = self.image_root / self.records[index]["file"]
        return self.transform(open_rgb(path, str(path)), flip=flip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        record = self.records[index]
        flip = self.transform.draw_flip()
        return self.image(index, flip), mirror_caption(record["caption"]) if flip else record["caption"]


class CaptionTrainingSet(torch.utils.data.Dataset):
    """(x, caption) for prior training: item i is record i // V in variant i % V (V = 2 with flips, where
    variant 1 is the mirrored image with the mirrored caption), so batches stay a pure function of the step.

    x is the image (`tokens=None`), or the cached tokens of the record's image: `tokens` is a token cache
    (`data.cache.TokenCacheDataset`, [original, flipped] per image) and `image_index[r]` the cache row of
    record r (records and cache rows are matched by image file).
    """

    def __init__(self, captions: CaptionDataset, flips: bool, tokens=None, image_index: list[int] | None = None):
        self.captions, self.variants = captions, 2 if flips else 1
        self.tokens, self.image_index = tokens, image_index
        if tokens is not None and (image_index is None or len(image_index) != len(captions.records)):
            raise TesseraError("a token cache needs the cache row of every caption record")

    def __len__(self) -> int:
        return len(self.captions.records) * self.variants

    def __getitem__(self, index: int):
        r, variant = divmod(index, self.variants)
        caption = self.captions.records[r]["caption"]
        if variant:
            caption = mirror_caption(caption)
        if self.tokens is None:
            return self.captions.image(r, flip=bool(variant)), caption
        return self.tokens[self.image_index[r]][0][variant], caption


def cache_rows(records: list[dict], files: list, image_root) -> list[int]:
    """Row of each caption record in an image data set (and its token cache) listing `files` under
    `image_root`; TesseraError naming the first record whose image is not in the set."""
    root = Path(image_root)
    row = {Path(f).relative_to(root).as_posix(): i for i, f in enumerate(files)}
    out = []
    for record in records:
        key = Path(record["file"]).as_posix()
        if key not in row:
            raise TesseraError(f"caption record for {record['file']} has no image in {root}: the captions "
                               "and data.root disagree")
        out.append(row[key])
    return out
