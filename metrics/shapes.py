"""The offline domain metric for the shapes set: a small CNN trained once on its train split, used as
Inception is for FID.

`shapes_metrics(images, labels)` reports the classifier's accuracy on generated images (does a
class-conditional model draw the class it was asked for?) and a Fréchet distance in the classifier's feature
space against the val split (shapes-FID). Nothing downloads: the classifier trains in seconds on 2 CPU cores
and is cached under `<cache dir>/shapes-classifier/`, keyed by the data set's parameters.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.folders import ImageFolderDataset, open_rgb
from data.shapes import CLASSES, default_shapes_root, ensure_shapes, tessera_cache_dir
from engine.errors import TesseraError
from metrics.fid import feature_statistics, frechet_distance

CLASSIFIER_VERSION = 1  # bump when the network or its training changes: old caches are then ignored
INPUT_SIZE = 32
TRAIN_SEED = 0


class ShapesClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4) and two linear layers; any input size is resized to 32x32 first.

    features(x [B, 3, H, W] in [-1, 1]) -> [B, feature_dim]  (the penultimate layer, before its ReLU)
    forward(x)                          -> [B, num_classes] logits
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16, feature_dim: int = 128):
        super().__init__()

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.trunk = nn.Sequential(*stage(3, width), *stage(width, 2 * width), *stage(2 * width, 4 * width))
        self.embed = nn.Linear(4 * width * (INPUT_SIZE // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(resize_to_input(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def resize_to_input(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, 32, 32] (antialiased bilinear; a no-op at 32x32)."""
    if x.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return x
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)


def as_model_input(images) -> torch.Tensor:
    """Images -> float [N, 3, H, W] in [-1, 1].

    Accepts uint8 [N, H, W, 3] or [N, 3, H, W] (numpy or torch), or float in [-1, 1] in either layout.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise TesseraError(f"shapes metric wants a batch of RGB images [N, H, W, 3] or [N, 3, H, W], "
                           f"got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- training and the cache


def _dataset_identity(root: Path) -> tuple[dict, str]:
    meta = json.loads((root / "meta.json").read_text())
    text = json.dumps({"data": meta, "classifier": CLASSIFIER_VERSION, "seed": TRAIN_SEED}, sort_keys=True)
    return meta, hashlib.sha1(text.encode()).hexdigest()[:16]


def _cache_file(key: str, suffix: str) -> Path:
    return tessera_cache_dir() / "shapes-classifier" / f"{key}{suffix}"


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images resized to the classifier input: (float [N, 3, 32, 32] in [-1, 1], labels [N])."""
    dataset = ImageFolderDataset(root / split, resolution=INPUT_SIZE)
    chunks = []
    for start in range(0, len(dataset.files), 1024):
        arrays = [np.asarray(open_rgb(f, str(f))) for f in dataset.files[start : start + 1024]]
        chunks.append(resize_to_input(as_model_input(np.stack(arrays))))
    return torch.cat(chunks), torch.tensor(dataset.labels)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float(predictions.eq(y).float().mean())


def train_classifier(root: Path, steps: int = 300, batch_size: int = 64) -> tuple[ShapesClassifier, float]:
    """Train on root/train with a fixed seed; returns (model in eval mode, val accuracy).

    A quarter of every batch is turned grey, so the features must see shape and not only colour (each class
    is identifiable by either); half is mirrored (every class is mirror-symmetric as a set); and Gaussian
    noise of a random level up to 0.15 makes the verdict robust to the speckle a young generator leaves.
    """
    x_train, y_train = load_split(root, "train")
    x_val, y_val = load_split(root, "val")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = ShapesClassifier(num_classes=len(CLASSES))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.15)
        model.train()
        for _ in range(steps):
            index = torch.randint(len(x_train), (batch_size,))
            x, y = x_train[index], y_train[index]
            grey = torch.rand(batch_size, 1, 1, 1) < 0.25
            x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
            flip = torch.rand(batch_size, 1, 1, 1) < 0.5
            x = torch.where(flip, x.flip(-1), x)
            x = x + torch.randn_like(x) * torch.rand(batch_size, 1, 1, 1) * 0.15
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), _accuracy(model, x_val, y_val)


def _resolve_root(resolution: int, root) -> Path:
    if root is None:
        return ensure_shapes(default_shapes_root(resolution), resolution)
    root = Path(root).expanduser()
    return root if (root / "meta.json").is_file() else ensure_shapes(root, resolution)


def load_shapes_classifier(resolution: int = 32, root=None, device="cpu") -> ShapesClassifier:
    """The classifier for the shapes tree at `root`, in eval mode. root None -> the default tree at
    `resolution` (generated if missing); an existing root's own meta.json decides, `resolution` aside.

    Trained on first use (about half a minute on 2 CPU cores) and cached; the cache key covers the tree's
    meta.json, so a tree generated with other parameters gets its own classifier.
    """
    root = _resolve_root(resolution, root)
    _, key = _dataset_identity(root)
    weights = _cache_file(key, ".pt")
    model = ShapesClassifier(num_classes=len(CLASSES))
    if weights.is_file():
        try:
            saved = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["state_dict"])
        except Exception as e:  # a torn or foreign file: say which and how to recover
            raise TesseraError(f"cannot load the shapes classifier cache {weights} ({e}): "
                               "delete it to retrain") from e
        val_accuracy = float(saved["val_accuracy"])
    else:
        model, val_accuracy = train_classifier(root)
        if val_accuracy < 0.98:
            raise TesseraError(f"the shapes classifier reached only {val_accuracy:.3f} val accuracy on "
                               f"{root}: generate a larger train split (data.num_train)")
        weights.parent.mkdir(parents=True, exist_ok=True)
        scratch = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict(), "val_accuracy": val_accuracy}, scratch)
        os.replace(scratch, weights)
    model.data_root, model.cache_key, model.val_accuracy = root, key, val_accuracy
    return model.eval().to(device)


# ----------------------------------------------------------------------------- the metric


@torch.no_grad()
def classify(classifier: ShapesClassifier, images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """images (see `as_model_input`) -> (features float64 [N, D], predicted labels int64 [N])."""
    classifier.eval()
    x = as_model_input(images)
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for start in range(0, len(x), batch_size):
        f = classifier.features(x[start : start + batch_size].to(device))
        features.append(f.double().cpu())
        predictions.append(classifier.head(F.relu(f)).argmax(1).cpu())
    return torch.cat(features).numpy(), torch.cat(predictions).numpy()


def reference_statistics(classifier: ShapesClassifier, reference: str = "val") -> tuple[np.ndarray, ...]:
    """(mu [D], sigma [D, D]) of the classifier's features over a split of its own tree; cached next to it."""
    if reference not in ("train", "val"):
        raise TesseraError(f"shapes metric reference must be 'train' or 'val', not {reference!r}")
    stats_file = _cache_file(classifier.cache_key, f"-{reference}-stats.npz")
    if stats_file.is_file():
        with np.load(stats_file) as stats:
            return stats["mu"], stats["sigma"]
    x, _ = load_split(classifier.data_root, reference)
    mu, sigma = feature_statistics(classify(classifier, x)[0])
    scratch = stats_file.with_name(f".{stats_file.stem}.{os.getpid()}.tmp.npz")
    np.savez(scratch, mu=mu, sigma=sigma)
    os.replace(scratch, stats_file)
    return mu, sigma


def shapes_metrics(images, labels=None, classifier: ShapesClassifier | None = None,
                   reference: str = "val") -> dict:
    """images: uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1], any H, W (N >= 2).

    Returns {"num_images", "fid"} plus "accuracy" (fraction classified as `labels`) when labels are given.
    fid is the Fréchet distance between classifier features of `images` and of the reference split; it is
    biased upward for small N, so compare numbers computed with the same N.
    """
    classifier = classifier if classifier is not None else load_shapes_classifier()
    features, predictions = classify(classifier, images)
    if len(features) < 2:
        raise TesseraError(f"shapes metric needs at least 2 images, got {len(features)}")
    results = {"num_images": len(features)}
    if labels is not None:
        labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
        if len(labels) != len(predictions):
            raise TesseraError(f"shapes metric got {len(predictions)} images but {len(labels)} labels")
        results["accuracy"] = float((predictions == labels).mean())
    mu, sigma = feature_statistics(features)
    results["fid"] = frechet_distance(mu, sigma, *reference_statistics(classifier, reference))
    return results
