"""Image sources and reference statistics for compute_fid, with a content-addressed feature cache.

A source of images is one of
    a folder        every .png/.jpg/.jpeg below it, recursively, in sorted relative-path order
    an image .npz   ADM format: ``arr_0`` uint8 [N, H, W, 3] (optional ``arr_1`` labels)
    a dataset YAML  ``FILE.yaml[:split]`` whose ``data:`` section goes to ``data.build_dataset`` (split train)
A reference is a source of images, an ADM reference batch (``mu``, ``sigma`` and ``arr_0`` images for
precision/recall) or a statistics .npz (``mu``, ``sigma`` only).

Images reach Inception as uint8 RGB at their own size (the network resizes to 299); grayscale and
RGBA become RGB as PIL's convert("RGB") does. Features are cached under $TESSERA_CACHE/fid_stats/
(default ~/.cache/tessera), keyed by the sha256 of the images' bytes and of the Inception weights.
"""

import hashlib
import os
import re
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.errors import TesseraError
from metrics.fid import feature_statistics
from metrics.inception import InceptionFeatures, file_digest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_VERSION = "tessera-inception-features-v1"


def cache_root() -> Path:
    return Path(os.environ.get("TESSERA_CACHE", "~/.cache/tessera")).expanduser()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) -> uint8 in [0, 255]; the exact inverse of x / 127.5 - 1."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] with C in (1, 3, 4) -> [..., H, W, 3] (gray repeated, alpha dropped)."""
    c = images.shape[-1]
    if c == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3] if c == 4 else images


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


class ImageSource(ABC):
    """A finite, ordered set of uint8 RGB images."""

    name: str
    kind: str

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, batch_size: int):
        """Yields uint8 [B, 3, H, W]; a batch never mixes image sizes."""

    @abstractmethod
    def digest(self) -> str:
        """sha256 that changes whenever any image's content (or the order) changes."""

    @property
    def labels(self) -> np.ndarray | None:
        return None

    def read_all(self) -> np.ndarray:
        """All images as one uint8 [N, H, W, 3] array (they must share one size)."""
        batches = [b.permute(0, 2, 3, 1).numpy() for b in self.batches(256)]
        if len({b.shape[1:] for b in batches}) > 1:
            raise TesseraError(f"{self.name}: images differ in size; this metric needs one size")
        return np.concatenate(batches)

    def describe(self) -> str:
        return f"{self.kind}, {len(self)} images"


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, root: Path):
        self.root, self.name = root, str(root)
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        self.files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
        if not self.files:
            raise TesseraError(f"{root}: no .png/.jpg/.jpeg images in this folder (searched recursively)")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as e:
            raise TesseraError(f"{path}: cannot decode image ({e}); remove or re-save it") from e

    def batches(self, batch_size: int):
        run = []
        for path in self.files:
            img = self._load(path)
            if run and (len(run) == batch_size or img.shape != run[0].shape):
                yield _nchw(np.stack(run))
                run = []
            run.append(img)
        if run:
            yield _nchw(np.stack(run))

    def digest(self) -> str:
        h = hashlib.sha256(b"folder")
        for path in self.files:
            h.update(path.relative_to(self.root).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(file_digest(path)))
        return h.hexdigest()


def _npz_members(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise TesseraError(f"{path}: not a readable .npz file ({e})") from e


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"npy format version {version}")


class NpzImages(ImageSource):
    """``arr_0`` of an .npz, streamed from the archive batch by batch (a 50k x 256^2 array is 9.8 GB)."""

    kind = "npz"

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        if "arr_0" not in _npz_members(path):
            raise TesseraError(f"{path}: no arr_0 in this .npz; expected ADM-format images "
                               "(np.savez(path, uint8 array [N, H, W, 3]))")
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            try:
                self.shape, self.fortran, dtype = _read_npy_header(f)
            except ValueError as e:
                raise TesseraError(f"{path}: arr_0 is not a readable npy array ({e})") from e
        channels_ok = len(self.shape) == 3 or (len(self.shape) == 4 and self.shape[3] in (1, 3, 4))
        if dtype != np.uint8 or not channels_ok:
            raise TesseraError(f"{path}: arr_0 is {dtype} {tuple(self.shape)}; expected uint8 images "
                               "[N, H, W, 3] (convert floats in [-1, 1] with round((x + 1) * 127.5))")
        self.image_shape = tuple(self.shape[1:]) if len(self.shape) == 4 else (*self.shape[1:], 1)

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def labels(self) -> np.ndarray | None:
        if "arr_1" not in _npz_members(self.path):
            return None
        with np.load(self.path) as z:
            return z["arr_1"]

    def batches(self, batch_size: int):
        if self.fortran:
            with np.load(self.path) as z:
                images = z["arr_0"].reshape(len(self), *self.image_shape)
            for lo in range(0, len(self), batch_size):
                yield _nchw(_to_rgb(images[lo:lo + batch_size]))
            return
        per_image = int(np.prod(self.image_shape))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            for lo in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - lo)
                buf = bytearray(f.read(n * per_image))  # writable, for torch.from_numpy
                if len(buf) != n * per_image:
                    raise TesseraError(f"{self.path}: arr_0 ends early (truncated file)")
                yield _nchw(_to_rgb(np.frombuffer(buf, np.uint8).reshape(n, *self.image_shape)))

    def digest(self) -> str:
        return hashlib.sha256(b"npz" + bytes.fromhex(file_digest(self.path))).hexdigest()


class DatasetImages(ImageSource):
    """Images of ``data.build_dataset(cfg.data, split)``: (image [3, H, W] in [-1, 1], label) items.

    Random flips are switched off: a reference must be the same images on every read.
    """

    kind = "dataset"

    def __init__(self, config: Path, split: str):
        from omegaconf import OmegaConf

        try:
            from data import build_dataset
        except ImportError as e:
            raise TesseraError(f"{config}: dataset configs need data.build_dataset ({e})") from e
        cfg = OmegaConf.load(config)
        if "data" not in cfg:
            raise TesseraError(f"{config}: no data: section; a dataset source is a config with one")
        self.name, self.split = f"{config}:{split}", split
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        data_cfg["random_flip"] = False
        self.dataset = build_dataset(data_cfg, split)
        self._labels = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> np.ndarray | None:
        if self._labels is None:
            for _ in self.batches(256):
                pass
        return self._labels

    def batches(self, batch_size: int):
        run, labels = [], []
        for i in range(len(self.dataset)):
            item = self.dataset[i]
            x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
            x = to_uint8(torch.as_tensor(x))
            if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
                raise TesseraError(f"{self.name}: item {i} is {tuple(x.shape)}, expected an image [3, H, W]")
            x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
            labels.append(int(y))
            if run and (len(run) == batch_size or x.shape != run[0].shape):
                yield torch.stack(run)
                run = []
            run.append(x)
        if run:
            yield torch.stack(run)
        self._labels = np.asarray(labels, dtype=np.int64)

    def digest(self) -> str:
        h = hashlib.sha256(b"dataset")
        for batch in self.batches(256):
            h.update(str(tuple(batch.shape[1:])).encode())
            h.update(batch.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        return f"dataset split {self.split}, {len(self)} images"


def _split_dataset_spec(spec: str) -> tuple[Path, str] | None:
    """"cfg.yaml" or "cfg.yaml:val" -> (path, split); None when the spec names no YAML file."""
    m = re.fullmatch(r"(.+\.ya?ml)(?::([\w.-]+))?", spec)
    return (Path(m[1]).expanduser(), m[2] or "train") if m else None


def open_images(spec: str | os.PathLike) -> ImageSource:
    """A folder, an image .npz or a dataset YAML -> its ImageSource."""
    spec = str(spec)
    dataset = _split_dataset_spec(spec)
    if dataset is not None:
        if not dataset[0].is_file():
            raise TesseraError(f"{dataset[0]}: no such config file")
        return DatasetImages(*dataset)
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise TesseraError(f"{path}: no such file or directory")
    if path.suffix == ".npz":
        return NpzImages(path)
    raise TesseraError(f"{path}: not an image folder, .npz or dataset .yaml")


@dataclass
class Reference:
    """What samples are compared against: given statistics, images, or both (ADM reference batch)."""

    name: str
    kind: str  # "adm" | "stats" | "images"
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    images: ImageSource | None = None

    def describe(self) -> str:
        if self.kind == "stats":
            return "statistics (mu, sigma)"
        if self.kind == "adm":
            return f"ADM reference batch: mu, sigma and {len(self.images)} images"
        return self.images.describe()


def open_reference(spec: str | os.PathLike) -> Reference:
    """A reference batch / statistics .npz (mu, sigma [+ arr_0]) or any image source."""
    path = Path(str(spec)).expanduser()
    if path.suffix == ".npz" and path.is_file():
        keys = _npz_members(path)
        if {"mu", "sigma"} <= keys:
            with np.load(path) as z:
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
                raise TesseraError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D]")
            images = NpzImages(path) if "arr_0" in keys else None
            return Reference(str(path), "adm" if images else "stats", mu, sigma, images)
        if "arr_0" not in keys:
            raise TesseraError(f"{path}: neither images (arr_0) nor statistics (mu, sigma) in this .npz")
    images = open_images(spec)
    return Reference(images.name, "images", images=images)


@dataclass
class Features:
    """Inception outputs of one source: pool [N, 2048], logits [N, 1008] (float64), pool's mu and sigma."""

    pool: np.ndarray
    logits: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def features_cache_path(source: ImageSource, inception: InceptionFeatures) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}|{source.digest()}|{inception.weights_digest}".encode()).hexdigest()
    return cache_root() / "fid_stats" / f"{key}.npz"


def source_features(source: ImageSource, inception: InceptionFeatures, batch_size: int = 50,
                    cache: bool = True) -> Features:
    """Inception features and FID statistics of ``source``, read from / written to the cache.

    Features are stored as float32, which is lossless: the network emits float32.
    """
    path = features_cache_path(source, inception) if cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                if len(z["pool"]) == len(source):
                    pool, logits = z["pool"].astype(np.float64), z["logits"].astype(np.float64)
                    return Features(pool, logits, z["mu"], z["sigma"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # a torn or foreign file: recompute and overwrite it
    pool, logits = inception.extract(source.batches(batch_size), total=len(source))
    mu, sigma = feature_statistics(pool)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(staging, pool=pool.astype(np.float32), logits=logits.astype(np.float32), mu=mu, sigma=sigma)
        os.replace(staging, path)
    return Features(pool, logits, mu, sigma)
