"""Image data sets read from disk: class-folder trees, flat folders and LSUN lmdb files.

Every item is `(image float32 [3, resolution, resolution] in [-1, 1], label int)`. File order is sorted, so
index i names the same image on every machine and every run.
"""

import io
import warnings
from pathlib import Path

import torch
from PIL import Image

from data.transforms import build_transform
from engine.errors import TesseraError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, sorted by its path relative to `directory`."""
    return sorted((p for p in directory.rglob("*") if p.is_file() and is_image_file(p)),
                  key=lambda p: p.relative_to(directory).as_posix())


def open_rgb(source: Path | bytes, name: str) -> Image.Image:
    """Decode an image fully (truncation shows up here, not later); TesseraError when it cannot be."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise TesseraError(f"cannot read image {name} ({type(e).__name__}: {e}): replace or delete it, "
                           "or set data.skip_corrupt=true to skip unreadable images") from e


def _check_root(root: str | Path, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TesseraError(f"data root {root} does not exist or is not a directory: expected {layout}")
    return root


class _ImageFiles(torch.utils.data.Dataset):
    """A sorted list of images (`.files`, or whatever `read` indexes) with aligned `.labels`."""

    def __init__(self, resolution: int, random_flip: bool, skip_corrupt: bool):
        self.resolution = int(resolution)
        self.transform = build_transform(resolution, random_flip)
        self.skip_corrupt = bool(skip_corrupt)
        self.num_skipped = 0  # counted per process: each DataLoader worker keeps its own count
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> Image.Image:
        return open_rgb(self.files[index], str(self.files[index]))

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The decoded image at `index` (or, with skip_corrupt, the next readable one) and its index."""
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return self.read(i), i
            except TesseraError as e:
                if not self.skip_corrupt:
                    raise
                self.num_skipped += 1
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping: {e}", stacklevel=2)
        raise TesseraError(f"no readable image in {self.root}: all {len(self)} images failed to decode")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, i = self.load(index)
        return self.transform(image), self.labels[i]


class ImageFolderDataset(_ImageFiles):
    """A class-folder tree, `root/<class>/**/<image>` (ImageNet, StanfordDogs, CUB, the shapes tree).

    classes = sorted names of the sub-directories of root; label = position of an image's class in that list.
    `.files` (sorted within each class, classes in order) and `.labels` are aligned lists.
    """

    def __init__(self, root, resolution: int, random_flip: bool = False, skip_corrupt: bool = False):
        super().__init__(resolution, random_flip, skip_corrupt)
        layout = "a class-folder tree <root>/<class_name>/<image>.{png,jpg,jpeg,webp,bmp}"
        self.root = _check_root(root, layout)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")
        self.files, self.labels = [], []
        for label, name in enumerate(self.classes):
            images = list_images(self.root / name)
            self.files += images
            self.labels += [label] * len(images)
        if not self.files:
            raise TesseraError(f"no images found in {self.root}: expected {layout}")
        self.num_classes = len(self.classes)


class FlatFolderDataset(_ImageFiles):
    """Every image under root, recursively (FFHQ and other unconditional sets); label 0, no classes."""

    def __init__(self, root, resolution: int, random_flip: bool = False, skip_corrupt: bool = False):
        super().__init__(resolution, random_flip, skip_corrupt)
        layout = "image files <root>/**/<image>.{png,jpg,jpeg,webp,bmp}"
        self.root = _check_root(root, layout)
        self.files = list_images(self.root)
        if not self.files:
            raise TesseraError(f"no images found in {self.root}: expected {layout}")
        self.labels = [0] * len(self.files)
        self.classes: list[str] = []
        self.num_classes = None


class LSUNDataset(_ImageFiles):
    """One LSUN category as released: an lmdb directory whose values are encoded images (webp / jpeg).

    Items are in sorted key order; label 0. The lmdb environment opens lazily in each process (an open
    environment must not cross a fork into DataLoader workers).
    """

    def __init__(self, root, resolution: int, random_flip: bool = False, skip_corrupt: bool = False):
        super().__init__(resolution, random_flip, skip_corrupt)
        self.root = _check_root(root, "an LSUN lmdb directory such as church_outdoor_train_lmdb/ "
                                      "holding data.mdb and lock.mdb")
        self._lmdb()
        self._env_handle = None
        with self._env().begin(write=False) as txn:
            self.keys = sorted(bytes(key) for key in txn.cursor().iternext(keys=True, values=False))
        self._env_handle.close()
        self._env_handle = None  # reopened on first read in each process
        if not self.keys:
            raise TesseraError(f"no images found in the lmdb {self.root}: is it an LSUN category export?")
        self.labels = [0] * len(self.keys)
        self.classes: list[str] = []
        self.num_classes = None

    def _lmdb(self):
        try:
            import lmdb
        except ImportError as e:
            raise TesseraError(f"LSUN needs the lmdb package: pip install lmdb (to read {self.root})") from e
        return lmdb

    def _env(self):
        if self._env_handle is None:
            try:
                self._env_handle = self._lmdb().open(str(self.root), readonly=True, lock=False,
                                                     readahead=False, meminit=False, max_readers=1)
            except Exception as e:  # lmdb.Error has no common base with OSError
                raise TesseraError(f"cannot open the lmdb {self.root} ({e}): expected an LSUN lmdb "
                                   "directory holding data.mdb") from e
        return self._env_handle

    def __getstate__(self):
        return {**self.__dict__, "_env_handle": None}

    def read(self, index: int) -> Image.Image:
        key = self.keys[index]
        with self._env().begin(write=False) as txn:
            value = txn.get(key)
        name = f"{self.root}[{key.decode(errors='replace')}]"
        if value is None:
            raise TesseraError(f"cannot read image {name}: key missing from the lmdb; "
                               "set data.skip_corrupt=true to skip it")
        return open_rgb(bytes(value), name)
