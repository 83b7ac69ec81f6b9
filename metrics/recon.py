"""Reconstruction metrics for tokenizers: PSNR, SSIM, LPIPS (VGG) and rFID.

Inputs are images in [-1, 1]; PSNR and SSIM are measured on the [0, 255] scale they map to (data range
255, no per-image min-max normalisation), after clamping to [-1, 1] as saving an image would.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import dist
from engine.errors import TesseraError
from metrics.fid import feature_statistics, frechet_distance
from metrics.inception import InceptionFeatures, cached_weights, hub_checkpoints_dir
from metrics.inputs import to_uint8

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights


def _to_255(x: torch.Tensor) -> torch.Tensor:
    return (x.double().clamp(-1, 1) + 1) * 127.5


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] pairs in [-1, 1] -> [B] PSNR in dB (inf for identical images)."""
    mse = (_to_255(x) - _to_255(x_hat)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (float64)."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, x_hat: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[B, C, H, W] pairs in [-1, 1] -> [B] SSIM (Wang et al. 2004).

    Gaussian window 11 / sigma 1.5 without padding, K1 = 0.01, K2 = 0.03, data range 255, population
    (co)variances; the map is averaged over valid positions and channels.
    """
    a, b = _to_255(x), _to_255(x_hat)
    if min(a.shape[-2:]) < size:
        raise TesseraError(f"SSIM needs images of at least {size}x{size}, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    w = gaussian_window(size, sigma).to(a.device)
    rows, cols = w.view(1, 1, size, 1).repeat(c, 1, 1, 1), w.view(1, 1, 1, size).repeat(c, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def vgg16_available() -> bool:
    return (hub_checkpoints_dir() / VGG16_FILE).is_file()


def build_lpips(vgg_weights: str | Path | None = None, allow_random: bool = False) -> torch.nn.Module:
    """LPIPS-VGG (the package's calibrated linear heads) with VGG16 trunk weights from a local file.

    ``vgg_weights`` is torchvision's VGG16 state dict ({VGG16_FILE}); by default the torch hub cache copy.
    ``allow_random`` keeps a random trunk when no file is found (tests only: the distances mean nothing).
    """
    import lpips

    path = Path(vgg_weights).expanduser() if vgg_weights is not None else hub_checkpoints_dir() / VGG16_FILE
    if vgg_weights is not None and not path.is_file():
        raise TesseraError(f"VGG16 weights file {path} does not exist; pass torchvision's {VGG16_FILE}")
    if not path.is_file() and not allow_random:
        raise TesseraError(f"LPIPS needs torchvision's VGG16 weights: put {VGG16_FILE} in "
                           f"{hub_checkpoints_dir()}/ or pass its path (--lpips-weights FILE)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about `pretrained=False`
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path.is_file():
        _load_vgg_trunk(net, path)
    return net.eval().requires_grad_(False)


def _load_vgg_trunk(net: torch.nn.Module, path: Path) -> None:
    """Copy torchvision ``features.{i}.*`` tensors into LPIPS's ``slice{k}.{i}.*`` trunk."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TesseraError(f"cannot read VGG16 weights {path} ({type(e).__name__}); want {VGG16_FILE}") from e
    with torch.no_grad():
        for name, param in net.net.named_parameters():
            _, index, kind = name.split(".")
            key = f"features.{index}.{kind}"
            if key not in state or state[key].shape != param.shape:
                raise TesseraError(f"{path} is not torchvision's VGG16 state dict ({key} missing or differs)")
            param.copy_(state[key])


class ReconMetrics:
    """Accumulates PSNR, SSIM, LPIPS and (when an Inception is available) rFID over (x, x_hat) batches.

    rFID is on when ``inception`` or ``inception_weights`` is given, or the weights sit in the torch
    hub cache. ``compute`` reduces over all processes, so each rank may see its own shard of images.
    """

    def __init__(self, lpips_weights=None, inception_weights=None, inception: InceptionFeatures | None = None,
                 lpips_net: torch.nn.Module | None = None, allow_random: bool = False, device="cpu"):
        if lpips_net is None and lpips_weights is None and not allow_random and not vgg16_available():
            self.lpips = None  # LPIPS is reported only when the VGG16 weights are on disk
            print(f"LPIPS off: put {VGG16_FILE} in {hub_checkpoints_dir()}/ or pass --lpips-weights FILE")
        else:
            self.lpips = lpips_net if lpips_net is not None else build_lpips(lpips_weights, allow_random)
            self.lpips.to(device)
        if inception is None and (inception_weights is not None or cached_weights() is not None):
            inception = InceptionFeatures(inception_weights, device)
        self.inception = inception
        self.sums = torch.zeros(4, dtype=torch.float64)  # psnr, ssim, lpips, count
        self.real, self.fake = [], []
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """x, x_hat: [B, 3, H, W] in [-1, 1]."""
        if x.shape != x_hat.shape or x.dim() != 4:
            raise TesseraError(f"reconstruction {tuple(x_hat.shape)} does not match input {tuple(x.shape)}")
        self.device = x.device
        x_hat = x_hat.to(x.device).clamp(-1, 1)
        if self.lpips is not None:
            dist_lpips = self.lpips.to(x.device)(x.float(), x_hat.float()).flatten()
        else:
            dist_lpips = torch.full((len(x),), float("nan"), device=x.device)
        self.sums += torch.stack([psnr(x, x_hat).sum().cpu(), ssim(x, x_hat).sum().cpu(),
                                  dist_lpips.double().sum().cpu(), torch.tensor(float(len(x)))])
        if self.inception is not None:
            self.real.append(self.inception(to_uint8(x))["pool"].numpy())
            self.fake.append(self.inception(to_uint8(x_hat))["pool"].numpy())

    def compute(self) -> dict[str, float]:
        sums = dist.all_reduce_sum(self.sums.to(self.device)).cpu()
        if sums[3] == 0:
            raise TesseraError("ReconMetrics.compute() before any update(): no images were evaluated")
        out = {"psnr": (sums[0] / sums[3]).item(), "ssim": (sums[1] / sums[3]).item()}
        if self.lpips is not None:
            out["lpips"] = (sums[2] / sums[3]).item()
        if self.inception is not None:
            gathered = dist.all_gather_object((self.real, self.fake))
            real = np.concatenate([a for r, _ in gathered for a in r])
            fake = np.concatenate([a for _, f in gathered for a in f])
            out["rfid"] = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
        return out


def write_random_vgg_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random VGG16 trunk weights under torchvision's ``features.{i}.*`` keys (tests, offline runs).

    Only the convolutional trunk LPIPS reads is written (58 MB instead of the full 528 MB file).
    """
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", UserWarning)
        trunk = lpips.pretrained_networks.vgg16(pretrained=False)
    state = {f"features.{name.split('.', 1)[1]}": p.detach().clone() for name, p in trunk.named_parameters()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
