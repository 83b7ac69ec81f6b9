"""Convolutional encoder and decoder in the taming layout, shared by the VQ, RQ and KL tokenizers.

Module and parameter names follow the published VQGAN layout (``down.{i}.block.{j}``, ``mid.attn_1``,
``up.{i}.upsample``, ...), so released weights map onto these modules key for key.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int) -> nn.GroupNorm:
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1 when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 conv projections, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, hw, C]
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (the published asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Mid(nn.Module):
    def __init__(self, ch: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, dropout)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _run(module, x, use_checkpoint: bool):
    if use_checkpoint and x.requires_grad:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """x [B, in_channels, R, R] -> z [B, z_channels (x2 if double_z), R/2^(L-1), R/2^(L-1)], L = len(ch_mult)."""

    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.0, in_channels=3, resolution=256, z_channels=256, double_z=False, mid_attn=True):
        super().__init__()
        self.grad_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = Level()
            c_in, c_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_out))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = Mid(c_in, dropout) if mid_attn else ResnetBlock(c_in, c_in, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = _run(block, h, self.grad_checkpointing)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run(self.mid, h, self.grad_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, z_channels, r, r] -> x [B, out_ch, r*2^(L-1), r*2^(L-1)] (no output activation)."""

    def __init__(self, *, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.0, out_ch=3, resolution=256, z_channels=256, mid_attn=True, **_unused_encoder_keys):
        super().__init__()
        self.grad_checkpointing = False
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in, dropout) if mid_attn else ResnetBlock(c_in, c_in, dropout)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = Level()
            c_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_out))
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            up.insert(0, level)  # up[0] is the highest resolution, as in the published layout
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        h = _run(self.mid, self.conv_in(z), self.grad_checkpointing)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = _run(block, h, self.grad_checkpointing)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvTokenizer(nn.Module):
    """The body every conv tokenizer shares: ``encoder`` -> ``quant_conv`` -> (bottleneck) -> ``post_quant_conv``
    -> ``decoder``; subclasses add the bottleneck (vector, residual or Gaussian).

    Args:
        autoencoder: Encoder/Decoder kwargs (ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution,
            z_channels, mid_attn).
        embed_dim: width of the latent between quant_conv and post_quant_conv.
        moments: the encoder and quant_conv emit twice the channels (a Gaussian's mean and log-variance).
        decoder: Decoder kwargs that differ from the encoder's (e.g. attn_resolutions).
    """

    def __init__(self, autoencoder: dict, embed_dim: int, moments: bool = False, decoder: dict | None = None):
        super().__init__()
        ae = dict(autoencoder)
        ae.pop("double_z", None)
        self.resolution = int(ae.get("resolution", 256))
        self.stride = 2 ** (len(ae.get("ch_mult", (1, 1, 2, 2, 4))) - 1)
        self.latent_size = self.resolution // self.stride
        z_channels = int(ae.get("z_channels", 256))
        factor = 2 if moments else 1
        self.encoder = Encoder(**ae, double_z=moments)
        self.decoder = Decoder(**{**ae, **(decoder or {})})
        self.quant_conv = nn.Conv2d(factor * z_channels, factor * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (the GAN loss's adaptive weight is computed against it)."""
        return self.decoder.last_layer

    def set_grad_checkpointing(self, on: bool) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = on
