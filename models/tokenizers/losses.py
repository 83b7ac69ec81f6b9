"""Tokenizer training losses: pixel + LPIPS reconstruction, PatchGAN with hinge loss, adaptive weight.

The generator objective is ``rec + perceptual_weight * LPIPS + lambda * disc_factor * g_loss + q_loss``
where ``lambda = ||grad_W rec_total|| / (||grad_W g_loss|| + 1e-4)`` on the decoder's last conv weight,
clamped to [0, 1e4] and scaled by ``disc_weight`` (the published adaptive weight). Before ``disc_start``
the discriminator is neither run nor trained, so its BatchNorm statistics do not drift.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine import dist
from models.tokenizers.autoencoder import group_norm


class NLayerDiscriminator(nn.Module):
    """PatchGAN: x [B, 3, H, W] -> real/fake logits [B, 1, h, w] (parameter names as in the published one)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        norm_layer = {"batch": nn.BatchNorm2d, "group": group_norm}[norm]
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(rec_loss, g_loss, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """The published lambda, from gradients averaged over all processes (so it equals the one-process value)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].detach().clone()
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].detach().clone()
    dist.all_reduce_mean(rec_grad)
    dist.all_reduce_mean(g_grad)
    lam = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return lam.clamp(0.0, 1e4).detach() * disc_weight


class TokenizerLoss(nn.Module):
    """Reconstruction (+ LPIPS) and the adversarial game.

    Args:
        pixel: "l1" | "l2".
        perceptual_weight: weight of LPIPS (VGG); 0 skips building the network.
        lpips_weights: path of the torchvision VGG16 weights file for LPIPS (see metrics.recon).
        disc_start: first step at which the discriminator trains and the adversarial term is on.
        disc_weight, disc_factor: multiplier on the adaptive weight / on both adversarial terms.
        disc_loss: "hinge" | "vanilla".
        disc_ndf, disc_layers, disc_norm: PatchGAN width, depth and norm ("batch" as published, or "group").
        codebook_weight: multiplier on the quantizer's loss.
    """

    def __init__(self, pixel="l1", perceptual_weight=1.0, lpips_weights=None, disc_start=0, disc_weight=0.8,
                 disc_factor=1.0, disc_loss="hinge", disc_ndf=64, disc_layers=3, disc_norm="batch",
                 disc_enabled=True, codebook_weight=1.0, kl_weight=1e-6):
        super().__init__()
        self.pixel, self.perceptual_weight = pixel, perceptual_weight
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.codebook_weight, self.kl_weight = codebook_weight, kl_weight
        self.disc_enabled = disc_enabled and disc_factor > 0
        self.d_loss_fn = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}[disc_loss]
        self.discriminator = NLayerDiscriminator(3, disc_ndf, disc_layers, disc_norm) if self.disc_enabled else None
        self.perceptual = None
        if perceptual_weight > 0:
            from metrics.recon import build_lpips

            self.perceptual = build_lpips(vgg_weights=lpips_weights).eval().requires_grad_(False)

    def disc_active(self, step: int) -> bool:
        return self.disc_enabled and step >= self.disc_start

    def reconstruction(self, x, x_hat) -> tuple[torch.Tensor, dict]:
        rec = (x - x_hat).abs().mean() if self.pixel == "l1" else F.mse_loss(x_hat, x)
        logs = {"rec": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x_hat.float(), x.float()).mean()
            rec = rec + self.perceptual_weight * p
            logs["lpips"] = p.detach()
        return rec, logs

    def generator_loss(self, x, x_hat, q_loss, step: int, last_layer, discriminator=None):
        """Total autoencoder loss for one micro-batch -> (loss, logs)."""
        rec, logs = self.reconstruction(x, x_hat)
        loss = rec + self.codebook_weight * q_loss
        logs["q_loss"] = q_loss.detach()
        if self.disc_active(step):
            d = discriminator or self.discriminator
            g_loss = -d(x_hat).mean()
            lam = adaptive_weight(rec, g_loss, last_layer, self.disc_weight) if self.training else 0.0
            loss = loss + self.disc_factor * lam * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=torch.as_tensor(lam).detach())
        return loss, logs

    def discriminator_loss(self, discriminator, x, x_hat) -> tuple[torch.Tensor, dict]:
        logits_real, logits_fake = discriminator(x.detach()), discriminator(x_hat.detach())
        d_loss = self.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
