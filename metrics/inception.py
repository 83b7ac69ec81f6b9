"""Inception-v3 features for FID / IS / precision-recall, through torch-fidelity's TF-exact port.

The network is torch-fidelity's ``inception-v3-compat`` extractor: the 2015-12-05 TensorFlow graph's
weights, TF1 bilinear resize to 299x299 inside the model, so the numbers match the ADM evaluator.
Weights are never downloaded: they come from ``--inception-weights FILE`` or the torch hub cache.
"""

import hashlib
import os
import sys
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import TesseraError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid publishes the same converted weights (same hash suffix) under another name.
WEIGHTS_FILE_ALIASES = (WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth")
FEATURES = ("2048", "logits_unbiased")


def hub_checkpoints_dir() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights() -> Path | None:
    """The Inception weights file in the torch hub cache, if one is there."""
    for name in WEIGHTS_FILE_ALIASES:
        path = hub_checkpoints_dir() / name
        if path.is_file():
            return path
    return None


def resolve_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use: the given path, else the torch hub cache; never a download."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise TesseraError(f"Inception weights file {path} does not exist; pass an existing "
                               f"{WEIGHTS_FILE} to --inception-weights")
        return path
    path = cached_weights()
    if path is not None:
        return path
    raise TesseraError(f"Inception weights not found: put {WEIGHTS_FILE_ALIASES[1]} (or its torch-fidelity "
                       f"name {WEIGHTS_FILE}) in {hub_checkpoints_dir()}/ or pass --inception-weights FILE")


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures:
    """Pool3 features and unbiased logits of uint8 RGB images.

    The network is built on first use, so a run whose statistics are all cached never loads it.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.weights_path = resolve_weights(weights_path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TesseraError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        self._net = None

    @cached_property
    def weights_digest(self) -> str:
        """Identifies the network in cache keys: statistics from other weights are other statistics."""
        return file_digest(self.weights_path)

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            self._net = _build_extractor(self.weights_path).to(self.device)
        return self._net

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: uint8 [B, 3, H, W] (any H, W: resized to 299 inside the network)
        -> {"pool": float64 [B, 2048], "logits_unbiased": float64 [B, 1008]} on the CPU."""
        if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
                and images.shape[1] == 3):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise TesseraError(f"Inception expects uint8 images [B, 3, H, W], got {got} "
                               f"{getattr(images, 'dtype', '')}")
        pool, logits = self.net(images.to(self.device))
        return {"pool": pool.double().cpu(), "logits_unbiased": logits.double().cpu()}

    def extract(self, batches, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Iterable of uint8 [B, 3, H, W] batches -> (pool float64 [N, 2048], logits float64 [N, 1008])."""
        pools, logits = [], []
        bar = tqdm(total=total, unit="img", desc="inception", disable=not sys.stderr.isatty(), leave=False)
        for batch in batches:
            out = self(batch)
            pools.append(out["pool"].numpy())
            logits.append(out["logits_unbiased"].numpy())
            bar.update(len(batch))
        bar.close()
        if not pools:
            raise TesseraError("no images to compute Inception features on")
        return np.concatenate(pools), np.concatenate(logits)


def _build_extractor(weights_path: Path) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity unpickles with weights_only=False; a file that loads with weights_only=True first
    # holds nothing but tensors and containers, so its second read is safe.
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TesseraError(f"cannot read Inception weights {weights_path} as a plain state dict "
                           f"({type(e).__name__}); expected {WEIGHTS_FILE}") from e
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                          feature_extractor_weights_path=str(weights_path))
    except RuntimeError as e:
        raise TesseraError(f"{weights_path} is not torch-fidelity's Inception state dict (keys or shapes "
                           f"differ); expected {WEIGHTS_FILE}") from e
    return net.eval().requires_grad_(False)


def write_random_weights(path: str | os.PathLike, seed: int = 0, logit_std: float = 3.0) -> Path:
    """Save a randomly initialised Inception in the released file's exact key layout (tests, offline runs).

    The default init shrinks activations to ~1e-8 by pool3, so each BatchNorm takes the mean and
    variance of its input on a few random images (variance floored at a tenth of the layer's mean, so
    channels dead on those images cannot explode on others), and the classifier is scaled so unbiased
    logits have std ``logit_std`` (an Inception Score away from 1). The numbers mean nothing; the
    file exercises the real loading and feature path.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class KeepRandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    def calibrate(bn, inputs):
        x = inputs[0]
        var = x.var(dim=(0, 2, 3))
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(var.clamp_min(0.1 * var.mean()))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        torch.manual_seed(seed)
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = KeepRandomInit("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(empty))
        noise = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        smooth = (torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4), size=32, mode="bilinear") * 255)
        hooks = [m.register_forward_pre_hook(calibrate) for m in net.modules()
                 if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            _, logits = net(torch.cat([noise, smooth.to(torch.uint8)]))
            for h in hooks:
                h.remove()
            net.fc.weight.mul_(logit_std / logits.std(dim=1).mean())
        staging = Path(tmp) / path.name
        torch.save(net.state_dict(), staging)
        os.replace(staging, path)
    return path
