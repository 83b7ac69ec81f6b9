"""data/: the shapes generator, folder readers, captions, transforms and build_dataset."""

import hashlib
import io
import json
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data.shapes as shapes
from data import DATA_DEFAULTS, build_caption_dataset, build_dataset
from data.captions import CaptionDataset, mirror_caption
from data.folders import FlatFolderDataset, ImageFolderDataset, LSUNDataset
from data.shapes import CLASS_DIRS, CLASSES, ensure_shapes, render, sample_attributes
from data.transforms import build_transform, center_crop_arr, to_pil, to_uint8
from engine.errors import TesseraError

SMALL = dict(resolution=32, num_train=160, num_val=32, seed=0)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "tree", **SMALL)


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_png(path, value=(10, 200, 30), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path)


# ----------------------------------------------------------------------------- shapes generator


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path, small_tree):
    again = ensure_shapes(tmp_path / "again", **SMALL)
    assert digest_tree(again) == digest_tree(small_tree)
    other = ensure_shapes(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = digest_tree(small_tree), digest_tree(other)
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) == SMALL["num_train"] + SMALL["num_val"]


def test_render_is_a_function_of_the_generator_state():
    a = render(3, np.random.default_rng([7, 1, 2]), 48)
    b = render(3, np.random.default_rng([7, 1, 2]), 48)
    assert a.dtype == np.uint8 and a.shape == (48, 48, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, render(3, np.random.default_rng([7, 1, 3]), 48))


def test_classes_are_balanced_and_folders_sort_in_class_order(small_tree):
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    assert CLASS_DIRS == sorted(CLASS_DIRS)
    for split, count in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        dataset = ImageFolderDataset(small_tree / split, 32)
        assert dataset.classes == CLASS_DIRS
        assert np.bincount(dataset.labels).tolist() == [count // len(CLASSES)] * len(CLASSES)
        relative = [f.relative_to(small_tree / split).as_posix() for f in dataset.files]
        assert relative == sorted(relative)
        assert all(CLASS_DIRS[label] == f.parent.name for f, label in zip(dataset.files, dataset.labels))


def test_classes_differ_in_colour(small_tree):
    """The mean foreground colour of each class is far from every other class's (the classes are easy)."""
    dataset = ImageFolderDataset(small_tree / "train", 32)
    means = np.zeros((len(CLASSES), 3))
    for f, label in zip(dataset.files, dataset.labels):
        image = np.asarray(Image.open(f), dtype=np.float64)
        foreground = np.abs(image - image[0, 0]).sum(-1) > 90  # the corner pixel is always background
        means[label] += image[foreground].mean(0) / (SMALL["num_train"] // len(CLASSES))
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(len(CLASSES)) * 1e9
    assert distances.min() > 100


def test_generation_speed_is_reported(tmp_path):
    start = time.perf_counter()
    ensure_shapes(tmp_path / "speed", 32, num_train=2000, num_val=8)
    seconds = time.perf_counter() - start
    print(f"shapes generation: {2008 / seconds:.0f} images/s at 32x32 ({seconds:.2f} s for 2008)")


def test_existing_tree_is_reused_and_a_mismatch_is_refused(tmp_path, small_tree):
    stamp = (small_tree / "meta.json").stat().st_mtime_ns
    assert ensure_shapes(small_tree, **SMALL) == small_tree
    assert (small_tree / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(TesseraError, match="num_train=160 .*wanted 200"):
        ensure_shapes(small_tree, **{**SMALL, "num_train": 200})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(TesseraError, match="foreign.*not a tessera shapes tree"):
        ensure_shapes(tmp_path / "foreign", **SMALL)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_write = shapes._write_split

    def write_then_die(split_dir, split_id, *args):
        real_write(split_dir, split_id, *args)
        if split_id == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path / "tree", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (ensure_shapes(tmp_path / "tree", **SMALL) / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TESSERA_DATA", raising=False)
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    assert shapes.default_shapes_root(64) == tmp_path / "cache" / "shapes-64"
    monkeypatch.setenv("TESSERA_DATA", str(tmp_path / "data"))
    assert shapes.default_shapes_root(32) == tmp_path / "data" / "shapes-32"


def test_captions_match_label_and_image(small_tree):
    """Every caption names its class; its position words agree with where the shape's pixels are."""
    records = list(map(json.loads, (small_tree / "train" / "captions.jsonl").read_text().splitlines()))
    assert len(records) == SMALL["num_train"]
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)
    for r in records:
        assert r["file"].startswith(CLASS_DIRS[r["label"]] + "/")
        words = r["caption"].split()
        assert r["caption"].startswith("a ") and words[1] in ("small", "medium", "large")
        assert f" {CLASSES[r['label']]} " in r["caption"]
        index = int(r["file"].split("/")[1][:6])
        attributes = sample_attributes(r["label"], np.random.default_rng([0, 0, index]), 32)
        assert r["caption"] == shapes.caption(attributes, 32)
        if CLASSES[r["label"]].split()[1] not in ("circle", "square", "cross", "ring"):
            continue  # centrally symmetric shapes: the pixel centroid is the drawn centre
        image = np.asarray(Image.open(small_tree / "train" / r["file"]), dtype=np.float64)
        ys, xs = np.nonzero(np.abs(image - image[0, 0]).sum(-1) > 90)
        for centre, low, high in ((xs.mean() + 0.5, "left", "right"), (ys.mean() + 0.5, "top", "bottom")):
            if abs(centre - 32 / 3) < 1 or abs(centre - 64 / 3) < 1:
                continue  # too close to a third to call
            assert (low in words) == (centre < 32 / 3) and (high in words) == (centre > 64 / 3), r


def test_size_words_follow_shape_area(small_tree):
    areas = {"small": [], "medium": [], "large": []}
    for r in map(json.loads, (small_tree / "train" / "captions.jsonl").read_text().splitlines()):
        image = np.asarray(Image.open(small_tree / "train" / r["file"]), dtype=np.float64)
        if r["label"] == 0:
            areas[r["caption"].split()[1]].append((np.abs(image - image[0, 0]).sum(-1) > 90).sum())
    assert max(areas["small"]) < min(areas["medium"]) and max(areas["medium"]) < min(areas["large"])


# ----------------------------------------------------------------------------- transforms


def test_adm_center_crop_by_hand():
    # 8x4 -> short side 4 >= 2*2: one box halving to 4x2 (2x2 means); no resize; centre columns 1..2.
    grid = (np.arange(32).reshape(4, 8) * 4).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(np.stack([grid] * 3, -1)), 2)
    assert out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[26, 34], [90, 98]]
    # 16x16 of constant 4x4 blocks -> two halvings -> the block values themselves.
    blocks = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    out = center_crop_arr(Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).convert("RGB"), 4)
    assert np.array_equal(out[..., 1], blocks)
    # 3x6 (W x H) -> no halving, bicubic to 2x4, centre rows 1..2 of a uniform image.
    out = center_crop_arr(Image.new("RGB", (3, 6), (9, 99, 199)), 2)
    assert out.shape == (2, 2, 3) and (out == [9, 99, 199]).all()


def test_transform_range_flip_and_round_trip():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    array[0, 0], array[0, 1] = 0, 255
    image = Image.fromarray(array)
    x = build_transform(16, random_flip=False)(image)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x), array) and np.array_equal(np.asarray(to_pil(x)), array)
    assert np.array_equal(to_uint8(x[None])[0], array) and len(to_pil(x[None])) == 1
    flipping = build_transform(16, random_flip=True)
    torch.manual_seed(0)
    outs = [flipping(image) for _ in range(20)]
    flipped = [torch.equal(o, x.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, x) for f, o in zip(flipped, outs)) and 0 < sum(flipped) < 20


def test_to_uint8_rounds_and_clips():
    x = torch.tensor([-2.0, -1.0, -0.002, 0.0, 0.5, 1.0, 3.0]).view(1, 7, 1).expand(3, 7, 1)
    assert to_uint8(x)[:, 0, 0].tolist() == [0, 0, 127, 128, 191, 255, 255]


# ----------------------------------------------------------------------------- folder readers


def test_image_folder_items_equal_the_pixels(small_tree):
    dataset = ImageFolderDataset(small_tree / "val", 32, random_flip=False)
    for index in (0, 5, len(dataset) - 1):
        x, label = dataset[index]
        pixels = torch.from_numpy(np.array(Image.open(dataset.files[index]))).permute(2, 0, 1)
        assert label == dataset.labels[index] and torch.allclose(x, pixels / 127.5 - 1)


def test_image_folder_extensions_and_order(tmp_path):
    for name in ("b/2.JPG", "b/1.png", "a/z.webp", "a/sub/y.BMP", "a/x.jpeg", "a/skip.txt", "c/readme.md"):
        path = tmp_path / name
        if path.suffix in (".txt", ".md"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(
                path.suffix.lower(), None))
    dataset = ImageFolderDataset(tmp_path, 8)
    assert dataset.classes == ["a", "b", "c"]
    assert [f.relative_to(tmp_path).as_posix() for f in dataset.files] == [
        "a/sub/y.BMP", "a/x.jpeg", "a/z.webp", "b/1.png", "b/2.JPG"]
    assert dataset.labels == [0, 0, 0, 1, 1] and dataset.num_classes == 3
    flat = FlatFolderDataset(tmp_path, 8)
    assert len(flat) == 5 and {flat[i][1] for i in range(5)} == {0} and flat.num_classes is None


@pytest.mark.parametrize("reader", [ImageFolderDataset, FlatFolderDataset])
def test_missing_and_empty_roots_are_named(tmp_path, reader):
    with pytest.raises(TesseraError, match=f"{tmp_path / 'nowhere'}.*expected"):
        reader(tmp_path / "nowhere", 32)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "class_a" / "notes.txt").write_text("no images here")
    with pytest.raises(TesseraError, match=f"no images found in {tmp_path / 'empty'}"):
        reader(tmp_path / "empty", 32)


def test_corrupt_image_stops_with_its_path_or_is_skipped(tmp_path):
    for i in range(3):
        write_png(tmp_path / "a" / f"{i}.png", value=(i * 50, 0, 0))
    bad = tmp_path / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    garbage = tmp_path / "b" / "0.jpg"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a jpeg")
    strict = ImageFolderDataset(tmp_path, 8)
    assert strict[0][1] == 0
    for index, path in ((1, bad), (3, garbage)):
        with pytest.raises(TesseraError, match=f"{path}.*data.skip_corrupt=true"):
            strict[index]
    lenient = ImageFolderDataset(tmp_path, 8, skip_corrupt=True)
    with pytest.warns(UserWarning, match=str(bad)):
        x, label = lenient[1]
    assert label == 0 and torch.allclose(x, lenient[2][0]) and abs(x[0, 0, 0] - (100 / 127.5 - 1)) < 1e-6
    with pytest.warns(UserWarning, match=str(garbage)):
        assert torch.allclose(lenient[3][0], lenient[0][0])  # wraps around to index 0
    assert lenient.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time a file is skipped it is counted, not warned
        lenient[1]
    assert lenient.num_skipped == 3


def test_lsun_without_lmdb_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now raises ImportError
    (tmp_path / "church_outdoor_train_lmdb").mkdir()
    with pytest.raises(TesseraError, match="LSUN needs the lmdb package: pip install lmdb.*church_outdoor"):
        LSUNDataset(tmp_path / "church_outdoor_train_lmdb", 32)
    with pytest.raises(TesseraError, match=f"{tmp_path / 'missing_lmdb'}.*LSUN lmdb"):
        LSUNDataset(tmp_path / "missing_lmdb", 32)


def test_lsun_reads_sorted_keys_through_lmdb(tmp_path, monkeypatch):
    """A stand-in lmdb module with the real call shapes: open -> begin -> cursor / get."""
    store = {}
    for key, value in ((b"b", 200), (b"a", 100), (b"c", 0)):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 8), (value, value, value)).save(buffer, format="WEBP", lossless=True)
        store[key] = buffer.getvalue()
    store[b"d"] = b"broken"

    class Txn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def cursor(self):
            return types.SimpleNamespace(iternext=lambda keys, values: iter(sorted(store)))

        def get(self, key):
            return store.get(key)

    class Env:
        def begin(self, write=False):
            return Txn()

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "lmdb", types.SimpleNamespace(open=lambda path, **kw: Env()))
    dataset = LSUNDataset(tmp_path, 8)
    assert dataset.keys == [b"a", b"b", b"c", b"d"] and len(dataset) == 4
    assert [round(float(dataset[i][0].mean()) * 127.5 + 127.5) for i in range(3)] == [100, 200, 0]
    with pytest.raises(TesseraError, match=r"\[d\].*skip_corrupt"):
        dataset[3]


# ----------------------------------------------------------------------------- captions and build_dataset


def test_caption_dataset_mirrors_words_with_the_image(small_tree):
    assert mirror_caption("a small red circle in the top left") == "a small red circle in the top right"
    assert mirror_caption("a large black crescent on the right") == "a large black crescent on the left"
    split = small_tree / "train"
    plain = CaptionDataset(split, split / "captions.jsonl", 32)
    records = plain.records
    index = next(i for i, r in enumerate(records) if "left" in r["caption"])
    x, text = plain[index]
    assert text == records[index]["caption"] and CLASSES[records[index]["label"]] in text
    flipping = CaptionDataset(split, split / "captions.jsonl", 32, random_flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        y, words = flipping[index]
        seen.add(words)
        same, mirrored = torch.equal(y, x) and words == text, torch.equal(y, x.flip(-1))
        assert same or (mirrored and words == mirror_caption(text))
    assert len(seen) == 2


def test_caption_file_errors_name_the_line(tmp_path, small_tree):
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"file": "a.png", "label": 0, "caption": "fine"}\n{"file": 3}\n')
    with pytest.raises(TesseraError, match="captions.jsonl:2"):
        CaptionDataset(small_tree / "train", bad, 32)
    with pytest.raises(TesseraError, match="nothing.jsonl"):
        CaptionDataset(small_tree / "train", tmp_path / "nothing.jsonl", 32)


def test_build_dataset_for_each_name(tmp_path, small_tree):
    assert DATA_DEFAULTS["name"] == "shapes" and DATA_DEFAULTS["resolution"] == 32
    cfg = {"name": "shapes", "root": str(small_tree), **SMALL, "random_flip": False}
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val), train.num_classes) == (160, 32, len(CLASSES))
    x, label = val[9]
    assert x.shape == (3, 32, 32) and label == val.labels[9]
    assert build_caption_dataset(cfg, "val")[0][1] == json.loads(
        (small_tree / "val" / "captions.jsonl").read_text().splitlines()[0])["caption"]
    from omegaconf import OmegaConf

    assert len(build_dataset(OmegaConf.create(cfg), "val")) == 32
    with pytest.raises(TesseraError, match="num_train"):
        build_dataset({**cfg, "num_train": 999}, "train")

    for name in ("x/a/0.png", "x/b/0.png", "y/train/a/0.png", "y/val/b/0.png", "y/val/c/0.png"):
        write_png(tmp_path / name)
    assert build_dataset({"name": "imagefolder", "root": str(tmp_path / "x")}, "train").classes == ["a", "b"]
    assert build_dataset({"name": "imagefolder", "root": str(tmp_path / "y")}, "val").classes == ["b", "c"]
    folder = build_dataset(OmegaConf.create({"name": "folder", "root": str(tmp_path / "y"), "resolution": 8}),
                           "train")
    assert len(folder) == 1 and folder[0][0].shape == (3, 8, 8)
    with pytest.raises(TesseraError, match="num_classes=1000.*2 classes"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "x"), "num_classes": 1000}, "train")
    with pytest.raises(TesseraError, match="unknown data.name 'cifar'"):
        build_dataset({"name": "cifar"}, "train")
    with pytest.raises(TesseraError, match="needs data.root"):
        build_dataset({"name": "folder"}, "train")
