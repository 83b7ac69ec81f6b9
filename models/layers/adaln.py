"""Adaptive layer norm (adaLN-Zero): a condition vector sets the shift, scale and gate of each branch.

The modulation Linear starts at zero, so every gate is 0 and an ``AdaLNZero`` block starts as the identity.
"""

import torch
from torch import nn

from models.layers.attention import Attention, KVCache
from models.layers.mlp import MLP, make_norm


def _per_token(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B, dim] modulation broadcast over tokens of x [B, T, dim]; [B, T, dim] passes through."""
    return t.unsqueeze(1) if t.dim() == x.dim() - 1 else t


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift; x [B, T, dim] (or [B, dim]), shift/scale [B, dim] or per token like x."""
    return x * (1 + _per_token(scale, x)) + _per_token(shift, x)


class AdaLNZero(nn.Module):
    """Transformer block conditioned by adaLN-Zero, x [B, T, dim], c [B, cond_dim] (or [B, T, cond_dim]).

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))     (zero-initialised)
        x = x + gate1 * attn(modulate(norm(x), shift1, scale1))
        x = x + gate2 * mlp(modulate(norm(x), shift2, scale2))

    The norms have no affine parameters (the modulation replaces them).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        norm: str = "layernorm",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim, elementwise_affine=False)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm2 = make_norm(norm, dim, elementwise_affine=False)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind=mlp, dropout=dropout)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        h = self.attn(
            modulate(self.norm1(x), shift1, scale1),
            causal=causal,
            rope=rope,
            cache=cache,
            attn_mask=attn_mask,
        )
        x = x + _per_token(gate1, x) * h
        return x + _per_token(gate2, x) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class AdaLNFinal(nn.Module):
    """Output layer Linear(modulate(norm(x), shift, scale)): [B, T, dim] -> [B, T, out_dim]; zero at init."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.modulation[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
