"""DiffLoss: a small diffusion model per token, conditioned on the transformer's vector z for that token.

The denoiser is a residual MLP with adaLN: y = time_embed(t) + cond_embed(z) sets the shift, scale and gate of
every block. It predicts [eps | v] for a C-channel token: eps-prediction with a learned-range variance on the
1000-step cosine schedule, trained with MSE + VLB (samplers.diffusion). Sampling is ancestral DDPM on a
respaced schedule, with classifier-free guidance on eps inside the loop and a temperature on the per-step noise.

Parameter names follow the published head (``net.time_embed.mlp.0``, ``net.res_blocks.{j}.adaLN_modulation.1``,
``net.final_layer.linear``, ...), so released weights load key for key.
"""

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import TesseraError
from samplers.diffusion import GaussianDiffusion
from samplers.rng import randn


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """The diffusion maths runs in float64 for float64 inputs, else in float32 (also under autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t [N] -> [N, dim], [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """t [N] -> [N, width]: sinusoidal features (256), Linear, SiLU, Linear."""

    def __init__(self, width: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # rows share few distinct steps (one while sampling, <= 1000 in training): embed each step once
        steps, inverse = torch.unique(t, return_inverse=True)
        return self.mlp(timestep_embedding(steps, self.frequency_size).to(self.mlp[0].weight.dtype))[inverse]


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) = Linear(SiLU(y)); [N, W] -> [N, W]."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """Linear(LN(x) * (1 + scale) + shift) with a parameter-free LN; [N, W] -> [N, out]."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DenoiserMLP(nn.Module):
    """(x_t [N, C], t [N], z [N, cond_dim]) -> [eps | v] [N, 2C]."""

    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:  # every block starts as the identity, the output as zero
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for m in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)


class DiffLoss(nn.Module):
    """The diffusion head of one token: training loss and sampling.

    Args:
        channels: token channels C (the diffused vector).
        cond_dim: width of the condition z.
        width, depth: the denoiser MLP.
        num_timesteps: training schedule length (cosine).
    """

    def __init__(self, channels: int, cond_dim: int, width: int = 1024, depth: int = 3, num_timesteps: int = 1000,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.channels = channels
        self.net = DenoiserMLP(channels, cond_dim, width, depth, grad_checkpointing)
        self.diffusion = GaussianDiffusion.cosine(num_timesteps)
        self._respaced: dict[int, GaussianDiffusion] = {}

    def sampling_diffusion(self, num_steps: int, device=None) -> GaussianDiffusion:
        if num_steps not in self._respaced:
            self._respaced[num_steps] = self.diffusion.respaced(num_steps)
        return self._respaced[num_steps].to(device or "cpu")

    def losses(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> dict:
        """Per-row losses {"loss", "mse", "vb"} [N] for clean tokens target [N, C] under conditions z [N, D].

        t [N] and noise [N, C] default to uniform steps and standard normal noise from the global RNG.
        """
        target = target.to(working_dtype(target))
        if t is None:
            t = torch.randint(0, self.diffusion.num_steps, (target.shape[0],), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        model_fn = lambda xt, ts: self.net(xt, ts, z).to(target.dtype)
        return self.diffusion.to(target.device).training_losses(model_fn, target, t, noise)

    def forward(self, target: torch.Tensor, z: torch.Tensor) -> dict:
        """Mean losses over the rows: {"loss" (with grad), "mse", "vb"}."""
        out = self.losses(target, z)
        return {"loss": out["loss"].mean(), "mse": out["mse"].detach().mean(), "vb": out["vb"].detach().mean()}

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generators: list[torch.Generator], num_steps: int = 100,
               temperature: float = 1.0, cfg: float = 1.0, clip_denoised: float = 0.0) -> torch.Tensor:
        """Draw tokens [B, k, C] for conditions z [B, k, D] (or [2B, k, D] = [cond; uncond] when cfg != 1).

        Row b's noise (x_T and every step's) comes only from generators[b], drawn in one call [num_steps, k, C].
        With guidance, eps = eps_uncond + cfg * (eps_cond - eps_uncond) on a shared x_t, and the variance is the
        conditional half's.
        """
        B = len(generators)
        guided = cfg != 1.0
        if z.dim() != 3 or z.shape[0] != (2 * B if guided else B):
            raise TesseraError(f"DiffLoss.sample got z {list(z.shape)} for {B} samples (cfg={cfg})")
        k, C = z.shape[1], self.channels
        diffusion = self.sampling_diffusion(num_steps, z.device)
        noise = randn(generators, diffusion.num_steps, k, C, device=z.device, dtype=working_dtype(z))  # [B, S, k, C]
        noise = noise.permute(1, 0, 2, 3).reshape(diffusion.num_steps, B * k, C)
        z_flat = z.reshape(-1, z.shape[-1])

        def model_fn(x, t):
            if not guided:
                out = self.net(x, t, z_flat).to(x.dtype)
                return out[:, :C], out[:, C:]
            out = self.net(torch.cat([x, x]), torch.cat([t, t]), z_flat).to(x.dtype)
            cond, uncond = out.chunk(2)
            return uncond[:, :C] + cfg * (cond[:, :C] - uncond[:, :C]), cond[:, C:]

        return diffusion.sample(model_fn, noise, temperature, clip_denoised).reshape(B, k, C)


def check_diffusion_steps(num_steps, num_timesteps: int = 1000) -> int:
    if int(num_steps) != num_steps or not 1 <= int(num_steps) <= num_timesteps:
        raise TesseraError(f"sampling num_sampling_steps={num_steps} must be an integer in [1, {num_timesteps}]")
    return int(num_steps)
