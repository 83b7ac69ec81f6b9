"""shapes: the built-in synthetic data set (8 coloured shapes on muted backgrounds), written once to disk.

Every image is a pure function of (seed, split, index): its generator is `default_rng([seed, split, index])`,
so a tree is byte-identical wherever and however often it is generated. Class `i % 8` draws image `i`,
so the classes are balanced. The tree is a class-folder tree that `data.folders.ImageFolderDataset` reads:

    root/meta.json                         the generation parameters (checked on every later call)
    root/<split>/<NN_colour_shape>/<index:06d>.png
    root/<split>/captions.jsonl            {"file": "00_red_circle/000000.png", "label": 0, "caption": "..."}
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.errors import TesseraError

# Colour and shape both differ between classes: the colours are the corners of the RGB cube.
CLASS_SPECS = [
    ("red", (220, 40, 40), "circle"),
    ("green", (40, 190, 70), "square"),
    ("blue", (40, 80, 230), "triangle"),
    ("yellow", (235, 215, 40), "cross"),
    ("magenta", (215, 50, 205), "star"),
    ("cyan", (40, 205, 215), "ring"),
    ("white", (240, 240, 240), "heart"),
    ("black", (25, 25, 25), "crescent"),
]
CLASSES: list[str] = [f"{colour} {shape}" for colour, _, shape in CLASS_SPECS]
CLASS_DIRS: list[str] = [f"{i:02d}_{name.replace(' ', '_')}" for i, name in enumerate(CLASSES)]
SPLITS = ("train", "val")
FORMAT_VERSION = 1  # bump when rendering changes, so stale trees and classifier caches are refused
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


def tessera_cache_dir() -> Path:
    """`$TESSERA_CACHE`, else ~/.cache/tessera: where every tessera cache lives."""
    return Path(os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera").expanduser()


def default_shapes_root(resolution: int = 32) -> Path:
    """`$TESSERA_DATA/shapes-<resolution>` if TESSERA_DATA is set, else `<cache dir>/shapes-<resolution>`."""
    parent = os.environ.get("TESSERA_DATA")
    return (Path(parent).expanduser() if parent else tessera_cache_dir()) / f"shapes-{resolution}"


# ----------------------------------------------------------------------------- outlines (unit radius)


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angle = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _star() -> np.ndarray:
    points = _regular(10, 1.0, -np.pi / 2)
    points[1::2] *= 0.45
    return points


def _cross(half_width: float = 0.3) -> np.ndarray:
    w, one = half_width, 0.95
    return np.array([(w, -one), (w, -w), (one, -w), (one, w), (w, w), (w, one),
                     (-w, one), (-w, w), (-one, w), (-one, -w), (-w, -w), (-w, -one)])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    points = np.stack([x, y + 2.5], axis=1)
    return points / np.abs(points).max()


_CIRCLE = _regular(48, 1.0)
# Each shape is a list of (polygon, fill): filled in order onto a mask, 255 adds and 0 cuts a hole.
_OUTLINES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(0.9 * _CIRCLE, 255)],
    "square": [(_regular(4, 1.0, np.pi / 4), 255)],
    "triangle": [(_regular(3, 1.0, -np.pi / 2), 255)],
    "cross": [(_cross(), 255)],
    "star": [(_star(), 255)],
    "ring": [(0.95 * _CIRCLE, 255), (0.55 * _CIRCLE, 0)],
    "heart": [(_heart(), 255)],
    "crescent": [(0.95 * _CIRCLE, 255), (0.8 * _CIRCLE + np.array([0.45, 0.0]), 0)],
}

# ----------------------------------------------------------------------------- one image


def sample_attributes(label: int, rng: np.random.Generator, resolution: int) -> dict:
    """Draw what an image of class `label` looks like: size, position (pixels), rotation, colours."""
    radius = rng.uniform(0.16, 0.34) * resolution
    cx, cy = rng.uniform(radius, resolution - radius, size=2)
    grey = rng.uniform(95, 160)
    background = np.clip(grey + rng.uniform(-15, 15, size=3), 0, 255)
    foreground = np.clip(np.array(CLASS_SPECS[label][1]) + rng.uniform(-12, 12, size=3), 0, 255)
    return {"label": int(label), "radius": float(radius), "cx": float(cx), "cy": float(cy),
            "angle": float(rng.uniform(0, 2 * np.pi)), "background": background, "foreground": foreground}


def draw(attributes: dict, resolution: int) -> np.ndarray:
    """attributes (from `sample_attributes`) -> uint8 [H, W, 3]."""
    big = resolution * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    painter = ImageDraw.Draw(mask)
    cos, sin = np.cos(attributes["angle"]), np.sin(attributes["angle"])
    rotation = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([attributes["cx"], attributes["cy"]])
    for polygon, fill in _OUTLINES[CLASS_SPECS[attributes["label"]][2]]:
        points = (polygon @ rotation * attributes["radius"] + centre) * SUPERSAMPLE
        painter.polygon([tuple(p) for p in points.tolist()], fill=fill)
    alpha = np.asarray(mask.resize((resolution, resolution), Image.BOX), dtype=np.float32)[..., None] / 255
    image = attributes["background"] * (1 - alpha) + attributes["foreground"] * alpha
    return np.round(image).astype(np.uint8)


def render(label: int, rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """One random image of class `label` -> uint8 [resolution, resolution, 3]."""
    return draw(sample_attributes(label, rng, resolution), resolution)


_SIZE_WORDS = ((0.22, "small"), (0.28, "medium"), (1.0, "large"))
_PLACES = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center",
    ("middle", "right"): "on the right", ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom", ("bottom", "right"): "in the bottom right",
}


def caption(attributes: dict, resolution: int) -> str:
    """'a small red circle in the top left': size, colour, shape and position (a 3x3 grid)."""
    size = next(word for limit, word in _SIZE_WORDS if attributes["radius"] / resolution < limit)
    thirds = lambda v, names: names[min(int(3 * v / resolution), 2)]
    place = _PLACES[(thirds(attributes["cy"], ("top", "middle", "bottom")),
                     thirds(attributes["cx"], ("left", "center", "right")))]
    return f"a {size} {CLASSES[attributes['label']]} {place}"


# ----------------------------------------------------------------------------- the tree on disk


def _write_split(split_dir: Path, split_id: int, count: int, resolution: int, seed: int) -> None:
    for class_dir in CLASS_DIRS:
        (split_dir / class_dir).mkdir(parents=True)
    records = []
    for index in range(count):
        label = index % len(CLASSES)
        attributes = sample_attributes(label, np.random.default_rng([seed, split_id, index]), resolution)
        file = f"{CLASS_DIRS[label]}/{index:06d}.png"
        Image.fromarray(draw(attributes, resolution)).save(split_dir / file, compress_level=1)
        records.append({"file": file, "label": label, "caption": caption(attributes, resolution)})
    records.sort(key=lambda record: record["file"])
    with open(split_dir / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def _read_meta(root: Path) -> dict:
    meta_file = root / "meta.json"
    if not meta_file.is_file():
        raise TesseraError(f"{root} exists but is not a tessera shapes tree (no meta.json): "
                           "point data.root at an empty or new directory")
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise TesseraError(f"cannot read {meta_file} ({e}): delete {root} to regenerate it") from e


def _check_meta(root: Path, wanted: dict) -> None:
    found = _read_meta(root)
    differ = [f"{key}={found.get(key)!r} (wanted {value!r})" for key, value in wanted.items()
              if found.get(key) != value]
    if differ:
        raise TesseraError(f"shapes tree {root} was generated with {', '.join(differ)}: "
                           "set data.root to another directory or delete this one")


def ensure_shapes(root: str | Path | None = None, resolution: int = 32, num_train: int = 10000,
                  num_val: int = 1000, seed: int = 0) -> Path:
    """Generate the shapes tree under `root` (default `default_shapes_root(resolution)`) unless it is there.

    Idempotent: an existing tree whose meta.json matches is reused; one made with other parameters is an
    error.
    The tree is written to a sibling temporary directory and renamed into place, so an interrupted run leaves
    no half tree, and processes racing to create the same tree all end up reading the winner's.
    """
    root = Path(root).expanduser() if root is not None else default_shapes_root(resolution)
    wanted = {"dataset": "tessera-shapes", "version": FORMAT_VERSION, "resolution": int(resolution),
              "num_train": int(num_train), "num_val": int(num_val), "seed": int(seed), "classes": CLASSES}
    if resolution < 8 or num_train < 1 or num_val < 1:
        raise TesseraError(f"shapes needs resolution >= 8 and num_train, num_val >= 1; got {resolution}, "
                           f"{num_train}, {num_val}")
    if root.exists() and any(root.iterdir()):
        _check_meta(root, wanted)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = root.parent / f".{root.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        for split_id, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
            _write_split(scratch / split, split_id, count, resolution, seed)
        (scratch / "meta.json").write_text(json.dumps(wanted, indent=1) + "\n")
        try:
            os.rename(scratch, root)  # atomic; replaces an empty directory, fails on a populated one
        except OSError:
            if not (root / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _check_meta(root, wanted)
    return root
