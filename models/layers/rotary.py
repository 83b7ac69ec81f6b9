"""Rotary position embeddings (RoPE), 1-D and 2-D axial, applied to every head after the head split.

A rotary table is one angle per (position, channel pair): ``angles[T, head_dim // 2]``. Channel pair i of
a head is ``(x[..., 2i], x[..., 2i + 1])`` and is rotated by ``angles[t, i]`` at position t, so

    rotate(q, t1) · rotate(k, t2)  depends on the positions only through  t1 - t2

(for 2-D tables: through the row offset and the column offset). The same table is applied to every head,
so every head sees positions. Positions that should carry no position (a class prefix) get angle 0.
"""

import torch


def rope_frequencies(dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation frequencies of a ``dim``-channel rotary sub-space: base^(-2i/dim), [dim // 2]."""
    if dim % 2:
        raise ValueError(f"rotary needs an even number of channels, got {dim}")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_1d(head_dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1-D table: positions [T] (int or float) -> angles [T, head_dim // 2]."""
    return positions.double()[:, None] * rope_frequencies(head_dim, base)[None, :]


def rope_2d(head_dim: int, rows: torch.Tensor, cols: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """2-D axial table: the first half of a head's channels rotates with the row, the second with the column.

    rows, cols: [T] grid coordinates of each position -> angles [T, head_dim // 2].
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary needs head_dim divisible by 4, got {head_dim}")
    return torch.cat([rope_1d(head_dim // 2, rows, base), rope_1d(head_dim // 2, cols, base)], dim=1)


def rope_2d_grid(head_dim: int, h: int, w: int, base: float = 10000.0) -> torch.Tensor:
    """2-D table of an h x w grid in raster order: angles [h * w, head_dim // 2]."""
    idx = torch.arange(h * w)
    return rope_2d(head_dim, idx // w, idx % w, base)


def rotary_cos_sin(angles: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) pair [T, head_dim // 2] that attention layers take as ``rope``."""
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs of x [B, heads, T, head_dim] by rope = (cos, sin), each [T, head_dim // 2]."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)
