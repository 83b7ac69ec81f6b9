"""Per-token layers: the transformer MLP (GELU or SwiGLU) and the norms (LayerNorm, RMSNorm)."""

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; [..., dim] -> [..., dim]. Computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: str, dim: int, elementwise_affine: bool = True) -> nn.Module:
    """``layernorm`` (eps 1e-6) or ``rmsnorm`` over the last dim."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=elementwise_affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, elementwise_affine=elementwise_affine)
    raise TesseraError(f"norm='{kind}' is not one of: layernorm, rmsnorm")


def swiglu_hidden(hidden_dim: int, multiple_of: int = 256) -> int:
    """SwiGLU width matching a ``hidden_dim`` GELU MLP in parameters: 2/3 of it, rounded up to multiple_of."""
    h = int(2 * hidden_dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """Position-wise feed-forward, [..., dim] -> [..., dim].

    kind ``gelu``:   fc2(gelu(fc1(x)))                   (fc1: dim -> hidden_dim)
    kind ``swiglu``: fc2(silu(fc1(x)) * fc3(x))          (fc1, fc3: dim -> swiglu_hidden(hidden_dim))
    Dropout is applied to the output (the residual branch).
    """

    def __init__(
        self, dim: int, hidden_dim: int, kind: str = "gelu", dropout: float = 0.0, bias: bool = True
    ):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise TesseraError(f"mlp='{kind}' is not one of: gelu, swiglu")
        self.kind = kind
        if kind == "swiglu":
            hidden_dim = swiglu_hidden(hidden_dim)
            self.fc3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.fc1(x)) * self.fc3(x)
        else:
            h = F.gelu(self.fc1(x), approximate="tanh")
        return self.drop(self.fc2(h))
