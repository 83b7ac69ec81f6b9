"""Transformer building blocks shared by the priors: SDPA attention + KV cache, rotary, MLP, norms, adaLN."""

from models.layers.adaln import AdaLNFinal, AdaLNZero, modulate
from models.layers.attention import Attention, Block, CrossAttention, KVCache, causal_mask
from models.layers.mlp import MLP, RMSNorm, make_norm
from models.layers.rotary import apply_rotary, rope_1d, rope_2d, rope_2d_grid, rotary_cos_sin

__all__ = [
    "MLP",
    "AdaLNFinal",
    "AdaLNZero",
    "Attention",
    "Block",
    "CrossAttention",
    "KVCache",
    "RMSNorm",
    "apply_rotary",
    "causal_mask",
    "make_norm",
    "modulate",
    "rope_1d",
    "rope_2d",
    "rope_2d_grid",
    "rotary_cos_sin",
]
