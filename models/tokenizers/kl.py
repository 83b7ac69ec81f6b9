"""KL tokenizer (the LDM-style KL-VAE): conv encoder -> moments -> diagonal Gaussian posterior -> conv decoder.

Tokens of one image: FloatTensor[c, h, w], the latent times ``scale_factor`` (a buffer saved with the weights;
``main_tokenizer.py --compute-scale`` sets it to 1/std of sampled latents over the training set, so priors see
latents of unit standard deviation). Parameter names match the published KL autoencoders (``encoder.*``,
``decoder.*``, ``quant_conv`` giving the 2c moments, ``post_quant_conv``).

Which latent is used where:
    training forward     a posterior sample (the reconstruction term sees the noise, as published)
    encode(x)            the posterior mean, scaled (deterministic: reconstruction metrics, on-the-fly prior
                         training); encode(x, sample=True) draws a posterior sample instead
    cache_encode(x)      the unscaled moments [mean | logvar], written once by main_tokenizer.py --cache
    cache_to_tokens(m)   a fresh posterior sample from cached moments, scaled: what a prior trains on each step
"""

from dataclasses import dataclass, field

import torch

from engine.errors import TesseraError
from models.registry import register_tokenizer
from models.tokenizers.autoencoder import ConvTokenizer


class DiagonalGaussian:
    """N(mean, exp(logvar)) over latents [B, c, h, w], built from moments [B, 2c, h, w] = [mean | logvar].

    logvar is clamped to [-30, 20] (as published) so that std never under- or overflows.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise TesseraError(f"posterior moments must be [B, 2c, h, w], got {list(moments.shape)}")
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) of each image, summed over its c*h*w latent entries -> [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class KLOutput:
    """What the training forward returns beside x_hat: loss (0-d, kl_weight * mean KL), logs (0-d tensors)."""

    posterior: DiagonalGaussian
    loss: torch.Tensor
    logs: dict = field(default_factory=dict)


@register_tokenizer("kl")
class KLTokenizer(ConvTokenizer):
    """x [B, 3, R, R] in [-1, 1] <-> scaled latents [B, embed_dim, R/f, R/f], f = 2^(len(ch_mult)-1).

    Args:
        autoencoder: Encoder/Decoder kwargs (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
            resolution, z_channels, mid_attn); the encoder is built with double_z (mean and logvar).
            The decoder runs num_res_blocks + 1 blocks per level (the published layout).
        decoder_attn_resolutions: attention resolutions of the decoder; None = the encoder's
            ``attn_resolutions``. The published KL-16 has none (only the mid block attends).
        embed_dim: latent channels c (the token channels).
        kl_weight: q.loss = kl_weight * KL, KL summed over the latent entries of an image and averaged over the
            batch. The reconstruction term of TokenizerLoss is a per-pixel mean, so the published recipe
            (sum-reduced losses, KL weight 1e-6) corresponds to kl_weight = 1e-6 / (3 * R * R).
        scale_factor: initial token scale (a buffer; --compute-scale overwrites it in the run directory).
    """

    kind = "kl"

    def __init__(self, *, autoencoder: dict, decoder_attn_resolutions=None, embed_dim: int = 16,
                 kl_weight: float = 1e-6, scale_factor: float = 1.0):
        decoder = None if decoder_attn_resolutions is None else {"attn_resolutions": list(decoder_attn_resolutions)}
        super().__init__(autoencoder, embed_dim, moments=True, decoder=decoder)
        if self.resolution % self.stride:
            raise TesseraError(f"resolution {self.resolution} is not divisible by the tokenizer's stride {self.stride}")
        self.kl_weight = float(kl_weight)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.embed_dim = embed_dim
        self.token_shape = (embed_dim, self.latent_size, self.latent_size)
        self.cache_shape = (2 * embed_dim, self.latent_size, self.latent_size)

    # ------------------------------------------------------------------ latents

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, R, R] -> unscaled moments [B, 2c, h, w] = [mean | logvar]."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise TesseraError(f"the kl tokenizer takes images [B, 3, {self.resolution}, {self.resolution}], "
                               f"got {list(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent [B, c, h, w] -> x_hat [B, 3, R, R] (not clamped: the training forward)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor):
        """Training forward: x [B,3,R,R] -> (x_hat [B,3,R,R] from a posterior sample, KLOutput)."""
        posterior = DiagonalGaussian(self.moments(x))
        x_hat = self.decode_latent(posterior.sample().to(x.dtype))
        kl = posterior.kl().mean()
        logs = {"kl": kl.detach(), "latent_std": posterior.mean.detach().std(),
                "posterior_std": posterior.std.detach().mean()}
        return x_hat, KLOutput(posterior, self.kl_weight * kl, logs)

    # ------------------------------------------------------------------ the tokenizer contract

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """x [B, 3, R, R] in [-1, 1] -> scaled latents [B, c, h, w]: the posterior mean, or a sample."""
        posterior = DiagonalGaussian(self.moments(x))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, c, h, w] -> images [B, 3, R, R], clamped to [-1, 1]."""
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != self.token_shape:
            raise TesseraError(f"the kl tokenizer decodes latents [B, {', '.join(map(str, self.token_shape))}], "
                               f"got {list(tokens.shape)}")
        z = tokens.to(self.post_quant_conv.weight.dtype) / self.scale_factor
        return self.decode_latent(z).clamp(-1, 1)

    @torch.no_grad()
    def cache_encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, R, R] -> unscaled moments [B, 2c, h, w] for the latent cache."""
        return self.moments(x).float()

    @torch.no_grad()
    def cache_to_tokens(self, moments: torch.Tensor) -> torch.Tensor:
        """Cached moments [B, 2c, h, w] -> a fresh posterior sample, scaled [B, c, h, w] (global RNG)."""
        return DiagonalGaussian(moments).sample() * self.scale_factor
