"""VQ tokenizer (VQ-VAE / VQGAN): conv encoder -> 1x1 conv -> vector quantizer -> 1x1 conv -> conv decoder.

Tokens of one image: LongTensor[h, w] code ids. Parameter names match the published VQGAN
(``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``, ``quantize.*``).
"""

import torch

from models.registry import register_tokenizer
from models.tokenizers.autoencoder import ConvTokenizer
from models.tokenizers.quantizers import VectorQuantizer


@register_tokenizer("vq")
class VQTokenizer(ConvTokenizer):
    """x [B, 3, R, R] in [-1, 1] <-> ids [B, R/f, R/f], f = 2^(len(ch_mult)-1).

    Args:
        autoencoder: Encoder/Decoder kwargs (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
            resolution, z_channels).
        embed_dim: width of the quantized latent between quant_conv and post_quant_conv.
        quantizer: VectorQuantizer kwargs (codebook_size, and the options documented there; the code
            width is ``quantizer.dim`` when factorised codes are used, else embed_dim).
    """

    kind = "vq"

    def __init__(self, *, autoencoder: dict, embed_dim: int = 256, quantizer: dict):
        super().__init__(autoencoder, embed_dim)
        q = dict(quantizer)
        q.setdefault("dim", embed_dim)
        if q["dim"] != embed_dim:
            q.setdefault("input_dim", embed_dim)
        self.quantize = VectorQuantizer(**q)
        self.token_shape = (self.latent_size, self.latent_size)
        self.codebook_size = int(q["codebook_size"])

    def forward(self, x):
        """Training forward: x [B,3,R,R] -> (x_hat [B,3,R,R], VQOutput with loss, ids and logs)."""
        q = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(q.z_q)), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, R, R] in [-1, 1] -> ids LongTensor[B, h, w]."""
        z = self.quant_conv(self.encoder(x))
        b, c, h, w = z.shape
        ids = self.quantize.quantize(z.permute(0, 2, 3, 1).reshape(-1, c))
        return ids.reshape(b, h, w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> code vectors [B, h, w, embed_dim]."""
        return self.quantize.lookup(ids)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> images [B, 3, R, R], clamped to [-1, 1]."""
        z_q = self.embed(ids).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1, 1)
