"""Classifiers for best-of-N rejection sampling (``sampling.rejection_n``).

Each returns a callable: images [B, 3, H, W] in [-1, 1] -> class probabilities [B, num_classes].
Selecting samples with a classifier biases FID-style evaluations; report it with the numbers.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import TesseraError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_classifier(spec: str | None, cfg, device):
    """spec: 'shapes' (the offline shapes classifier) or 'torchvision:ARCH:WEIGHTS.pth' (a local file)."""
    if spec is None:
        raise TesseraError("sampling.rejection_n > 1 needs --classifier shapes | torchvision:ARCH:WEIGHTS.pth")
    if spec == "shapes":
        from metrics.shapes import load_shapes_classifier

        net = load_shapes_classifier(resolution=int(cfg.data.resolution), device=device).eval()
        return lambda x: F.softmax(net(x), dim=-1)
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != "torchvision":
        raise TesseraError(f"--classifier '{spec}' is not 'shapes' or 'torchvision:ARCH:WEIGHTS.pth'")
    import torchvision

    _, arch, weights = parts
    if not Path(weights).is_file():
        raise TesseraError(f"classifier weights not found: {weights} (a torchvision {arch} state_dict file)")
    try:
        net = getattr(torchvision.models, arch)(weights=None)
    except AttributeError as e:
        raise TesseraError(f"torchvision has no model '{arch}'") from e
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def classify(x):
        x = F.interpolate((x + 1) / 2, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return F.softmax(net((x - mean) / std), dim=-1)

    return classify
