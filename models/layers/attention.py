"""Multi-head attention on PyTorch SDPA, a step-by-step KV cache, cross-attention, and the pre-norm block.

Shapes: B batch, T query positions, S key positions, dim model width, H heads, D = dim // H head width.
Attention masks follow SDPA: a bool mask is True where a query may attend a key.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError
from models.layers.mlp import MLP, make_norm
from models.layers.rotary import apply_rotary


class KVCache:
    """Keys and values of one self-attention layer, preallocated [B, H, max_len, D] and filled step by step.

    The buffers are allocated at the first ``append`` with the dtype and device of the incoming keys (so the
    cache follows autocast and the model's device). ``length`` is the number of filled positions. A CFG batch
    (conditional and unconditional rows stacked) is just a batch of 2B rows.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] at [length, length + T); return everything so far, [B, H, length, D]."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.max_len, D)
            self.v = v.new_zeros(B, H, self.max_len, D)
        if self.length + T > self.max_len:
            raise TesseraError(f"KV cache overflow: {self.length} + {T} positions > max_len {self.max_len}")
        if self.k.shape[0] != B:
            raise TesseraError(f"KV cache holds batch {self.k.shape[0]} but got {B} rows; start a new cache")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0


def causal_mask(num_queries: int, num_past: int, device=None) -> torch.Tensor:
    """Bool [T, past + T]: query i (absolute position past + i) attends keys 0 .. past + i."""
    q = torch.arange(num_queries, device=device)[:, None] + num_past
    k = torch.arange(num_past + num_queries, device=device)[None, :]
    return k <= q


class Attention(nn.Module):
    """Multi-head self-attention [B, T, dim] -> [B, T, dim]: causal or not, optional rotary and KV cache.

    rope: (cos, sin) tables [T, D // 2] for the T incoming positions (see models.layers.rotary), applied to
    q and k of every head after the head split. cache: a KVCache; incoming positions follow the cached ones.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % heads:
            raise TesseraError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim]; attn_mask: bool, broadcastable to [B, H, T, cached + T], True = may attend."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        is_causal = False
        if causal and T > 1:
            if past == 0 and attn_mask is None:
                is_causal = True
            else:
                m = causal_mask(T, past, x.device)
                attn_mask = m if attn_mask is None else attn_mask & m
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class CrossAttention(nn.Module):
    """Queries from x [B, T, dim], keys/values from context [B, S, context_dim] -> [B, T, dim]."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % heads:
            raise TesseraError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """context_mask: bool [B, S], True for real context tokens (False = padding)."""
        B, T, C = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-norm transformer block, [B, T, dim] -> [B, T, dim]:

    x = x + attn(norm1(x))                      (causal or not, rotary, KV cache)
    x = x + cross(norm_c(x), context)           (only when built with context_dim)
    x = x + mlp(norm2(x))
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        norm: str = "layernorm",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = True,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.cross = None
        if context_dim is not None:
            self.norm_c = make_norm(norm, dim)
            self.cross = CrossAttention(dim, context_dim, heads, qkv_bias, attn_dropout, proj_dropout=dropout)
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind=mlp, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, rope=rope, cache=cache, attn_mask=attn_mask)
        if self.cross is not None:
            if context is None:
                raise TesseraError("this block was built with cross-attention but got no context")
            x = x + self.cross(self.norm_c(x), context, context_mask)
        return x + self.mlp(self.norm2(x))
