"""Data sets behind one call: `build_dataset(data_cfg, split)` -> Dataset of (image [3,H,W] in [-1,1], label).

data.name picks the reader:
  shapes       the built-in synthetic set, generated on first use (root null -> default_shapes_root(res))
  imagefolder  class-folder tree (ImageNet, StanfordDogs, CUB): reads <root>/<split> if that directory exists,
               else <root> itself
  folder       every image under <root>/<split> (or <root>), label 0 (FFHQ)
  lsun         an LSUN lmdb directory given as root (the split is in the released file name)
"""

from pathlib import Path

from data.captions import CaptionDataset, CaptionTrainingSet, cache_rows
from data.folders import FlatFolderDataset, ImageFolderDataset, LSUNDataset
from data.shapes import CLASSES, default_shapes_root, ensure_shapes
from engine.errors import TesseraError

DATA_DEFAULTS: dict = {
    "name": "shapes",
    "root": None,
    "resolution": 32,
    "random_flip": True,
    "skip_corrupt": False,
    "num_workers": 0,
    "num_classes": None,
    "num_train": 10000,
    "num_val": 1000,
    "seed": 0,
    "captions": None,  # text priors: caption format shapes | coco | cub | tsv (null = no captions)
    "captions_path": None,  # the caption file/folder; "{split}" is replaced by the split (shapes: its own)
}
DATASET_NAMES = ("shapes", "imagefolder", "folder", "lsun")


def _options(data_cfg) -> dict:
    options = dict(DATA_DEFAULTS)
    options.update({key: data_cfg[key] for key in data_cfg})
    if options["name"] not in DATASET_NAMES:
        raise TesseraError(f"unknown data.name {options['name']!r}: choose one of {list(DATASET_NAMES)}")
    if options["name"] != "shapes" and options["root"] is None:
        raise TesseraError(f"data.name={options['name']} needs data.root: set it to the data set's directory")
    return options


def shapes_root(data_cfg) -> Path:
    """The shapes tree a config names, generated if missing (root null -> the default cache location)."""
    o = _options(data_cfg)
    root = o["root"] if o["root"] is not None else default_shapes_root(o["resolution"])
    return ensure_shapes(root, o["resolution"], o["num_train"], o["num_val"], o["seed"])


def _split_dir(root, split: str) -> Path:
    root = Path(root).expanduser()
    return root / split if (root / split).is_dir() else root


def build_dataset(data_cfg, split: str):
    """data_cfg: a dict or OmegaConf node with DATA_DEFAULTS' keys (missing ones take the defaults; keys this
    package does not use are left to the config schema to police).

    The returned data set has `.num_classes` (int, or None when unconditional) and `.classes`.
    """
    o = _options(data_cfg)
    common = {key: o[key] for key in ("resolution", "random_flip", "skip_corrupt")}
    if o["name"] == "shapes":
        if split not in ("train", "val"):
            raise TesseraError(f"shapes has splits 'train' and 'val', not {split!r}")
        dataset = ImageFolderDataset(shapes_root(data_cfg) / split, **common)
        if dataset.num_classes != len(CLASSES):
            raise TesseraError(f"shapes tree {dataset.root} has {dataset.num_classes} class folders, "
                               f"expected {len(CLASSES)}: delete it to regenerate")
    elif o["name"] == "imagefolder":
        dataset = ImageFolderDataset(_split_dir(o["root"], split), **common)
    elif o["name"] == "folder":
        dataset = FlatFolderDataset(_split_dir(o["root"], split), **common)
    else:
        dataset = LSUNDataset(o["root"], **common)
    wanted = o["num_classes"]
    if wanted is not None and dataset.num_classes is not None and wanted != dataset.num_classes:
        raise TesseraError(f"data.num_classes={wanted} but {dataset.root} has {dataset.num_classes} classes: "
                           "fix data.num_classes or data.root")
    return dataset


def build_caption_dataset(data_cfg, split: str) -> CaptionDataset:
    """(image, caption) pairs of the images build_dataset reads for `split`.

    shapes: <root>/<split>/captions.jsonl. Other sets: data.captions names the format (coco | cub | tsv) and
    data.captions_path the caption json / text folder / tsv ("{split}" in it is replaced by the split).
    """
    o = _options(data_cfg)
    if o["name"] == "shapes":
        split_dir = shapes_root(data_cfg) / split
        path = o["captions_path"].format(split=split) if o["captions_path"] else split_dir / "captions.jsonl"
        return CaptionDataset(split_dir, path, o["resolution"], o["random_flip"], format=o["captions"] or "shapes")
    if o["captions"] is None or o["captions_path"] is None:
        raise TesseraError(f"captions for data.name={o['name']} need data.captions (coco | cub | tsv) and "
                           "data.captions_path (the caption json, text folder or tsv)")
    if o["name"] == "lsun":
        raise TesseraError("data.name=lsun has no caption files; use a folder or imagefolder data set")
    return CaptionDataset(_split_dir(o["root"], split), str(o["captions_path"]).format(split=split),
                          o["resolution"], o["random_flip"], format=o["captions"])


def caption_training_set(data_cfg, images, token_cache=None) -> CaptionTrainingSet:
    """What a text prior trains on: (image or cached tokens, caption), flips as extra items when
    data.random_flip. `images` is build_dataset(data_cfg, "train") (its files index the token cache)."""
    captions = build_caption_dataset(dict(data_cfg, random_flip=False), "train")
    rows = cache_rows(captions.records, images.files, images.root) if token_cache is not None else None
    return CaptionTrainingSet(captions, bool(_options(data_cfg)["random_flip"]), token_cache, rows)


__all__ = ["DATA_DEFAULTS", "CLASSES", "build_dataset", "build_caption_dataset", "caption_training_set", "shapes_root",
           "ImageFolderDataset", "FlatFolderDataset", "LSUNDataset", "CaptionDataset"]
