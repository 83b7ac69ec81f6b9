"""Gumbel-softmax VQ tokenizer: the published VQGAN variant whose codes are chosen by a 1x1 conv of logits.

``GumbelQuantizer``: z [B, C, h, w] -> logits = proj(z) [B, K, h, w]; training draws a (straight-through
hard) Gumbel-softmax sample at ``temperature`` and mixes the codebook ``embed.weight`` [K, dim] with it,
plus ``kl_weight`` * KL(softmax(logits) || uniform); eval takes the argmax. Tokens are the argmax code,
so encoding is deterministic (the released text models drew them stochastically instead).

``GumbelVQTokenizer`` (``target: vq_gumbel``, kind "vq") is the VQ tokenizer with this quantizer: keys
``quantize.proj.{weight,bias}``, ``quantize.embed.weight`` as published (``proj`` reads ``embed_dim``
channels, which the published f8 model sets equal to z_channels).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError
from models.registry import register_tokenizer
from models.tokenizers.quantizers import VQOutput
from models.tokenizers.vq import VQTokenizer


class GumbelQuantizer(nn.Module):
    """Code choice by logits: forward z [B, in_dim, h, w] -> VQOutput (z_q [B, dim, h, w], ids [B, h, w])."""

    def __init__(self, codebook_size: int, dim: int, input_dim: int | None = None, temperature: float = 1.0,
                 kl_weight: float = 5e-4, straight_through: bool = True):
        super().__init__()
        if codebook_size < 2 or dim < 1 or temperature <= 0:
            raise TesseraError(f"gumbel quantizer needs codebook_size >= 2, dim >= 1, temperature > 0; got "
                               f"{codebook_size}, {dim}, {temperature}")
        self.codebook_size, self.dim = int(codebook_size), int(dim)
        self.input_dim = int(input_dim or dim)
        self.temperature, self.kl_weight, self.straight_through = float(temperature), float(kl_weight), straight_through
        self.proj = nn.Conv2d(self.input_dim, self.codebook_size, 1)
        self.embed = nn.Embedding(self.codebook_size, self.dim)

    @torch.no_grad()
    def quantize(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Most likely code of latents z_flat [M, input_dim] -> LongTensor[M]."""
        if z_flat.ndim != 2 or z_flat.shape[1] != self.input_dim:
            raise TesseraError(f"quantize expects latents [M, {self.input_dim}], got {tuple(z_flat.shape)}")
        w = self.proj.weight.view(self.codebook_size, self.input_dim)
        return F.linear(z_flat, w, self.proj.bias).argmax(-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> code vectors [..., dim]."""
        return self.embed(ids)

    def forward(self, z: torch.Tensor) -> VQOutput:
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise TesseraError(f"quantizer expects latents [B, {self.input_dim}, h, w], got {tuple(z.shape)}")
        logits = self.proj(z).float()  # [B, K, h, w]
        ids = logits.argmax(1)
        if self.training:
            hard = self.straight_through
            soft = F.gumbel_softmax(logits, tau=self.temperature, hard=hard, dim=1)
        else:
            soft = F.one_hot(ids, self.codebook_size).permute(0, 3, 1, 2).to(logits.dtype)
        z_q = torch.einsum("bkhw,kd->bdhw", soft, self.embed.weight.float()).to(z.dtype)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(1).mean()
        with torch.no_grad():
            counts = torch.bincount(ids.reshape(-1), minlength=self.codebook_size).float()
            p = counts / counts.sum()
            logs = dict(kl=kl.detach(), perplexity=torch.exp(-torch.xlogy(p, p).sum()),
                        usage_fraction=(counts > 0).float().mean())
        return VQOutput(z_q, ids, self.kl_weight * kl, logs)


@register_tokenizer("vq_gumbel")
class GumbelVQTokenizer(VQTokenizer):
    """VQTokenizer whose quantizer is a GumbelQuantizer (quantizer: codebook_size, temperature, kl_weight)."""

    def __init__(self, *, autoencoder: dict, embed_dim: int = 256, quantizer: dict):
        q = dict(quantizer)
        super().__init__(autoencoder=autoencoder, embed_dim=embed_dim,
                         quantizer={"codebook_size": 2, "dim": embed_dim})  # replaced below
        self.quantize = GumbelQuantizer(input_dim=embed_dim, dim=int(q.pop("dim", embed_dim)), **q)
        self.codebook_size = self.quantize.codebook_size
        if self.quantize.dim != embed_dim:
            raise TesseraError(f"vq_gumbel: code width quantizer.dim={self.quantize.dim} must equal embed_dim="
                               f"{embed_dim} (post_quant_conv reads the code vectors)")
