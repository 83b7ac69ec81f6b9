"""Hourglass transformer over a 2-D token grid: blocks at full resolution, merge 2x2 patches, a shorter valley,
split back into 2x2 patches, blocks at full resolution.

    depths = [d_0, d_1, ..., d_k, ..., d_1', d_0']        (odd length 2k + 1)

Level i runs d_i pre-norm blocks on its grid, merges every 2x2 patch into one token (linear merge, then
optionally attention resampling), runs level i + 1 on the grid halved in both directions, splits every token
back into its 2x2 patch (linear split, added to the level's pre-merge activations, then optionally attention
resampling) and runs d_i' blocks. The innermost d_k blocks (the valley) run on an (h / 2^k) x (w / 2^k) grid.
[2, 10, 2] is the published "2102" layout (shorten factor 4 = one 2x2 merge); [12] is a plain transformer.

Shapes: B batch, (h, w) grid of a level, N = h * w tokens in raster order, n = N / 4 merged tokens, dim width.

Patches: ``patch_groups(h, w)[j]`` lists the raster indices of the 2x2 patch that becomes merged token j
(coarse raster order; patch order top-left, top-right, bottom-left, bottom-right). The linear merge/split and
both attention resamplers use this one table, so they always act on the same patches.

Positions: 2-D axial rotary on every head after the head split (models.layers), at every level. All levels
share the finest grid's coordinate frame: a merged token sits at the centre of the patch it covers, so a
relative offset means the same distance in the valley as at full resolution. The attention resamplers work
inside one patch and carry no rotary: the linear merge/split already tells the four patch cells apart.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import TesseraError
from models.layers import Block, CrossAttention, make_norm, rope_2d, rotary_cos_sin


def patch_groups(h: int, w: int) -> torch.Tensor:
    """LongTensor [(h // 2) * (w // 2), 4]: raster indices (on the h x w grid) of each 2x2 patch."""
    if h % 2 or w % 2:
        raise TesseraError(f"a 2x2 patch merge needs an even grid, got {h} x {w}")
    rows = torch.arange(h // 2)[:, None] * 2
    cols = torch.arange(w // 2)[None, :] * 2
    top_left = (rows * w + cols).reshape(-1)
    return top_left[:, None] + torch.tensor([0, 1, w, w + 1])


def level_rope(head_dim: int, h: int, w: int, scale: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [h * w, head_dim // 2] of an h x w grid whose cells each cover scale x scale finest cells.

    Cell (r, c) sits at the centre of its footprint in finest-grid units: (scale * r + (scale - 1) / 2, ...).
    """
    idx = torch.arange(h * w)
    offset = (scale - 1) / 2
    rows = (idx // w).double() * scale + offset
    cols = (idx % w).double() * scale + offset
    return rotary_cos_sin(rope_2d(head_dim, rows, cols, base))


class PatchMerge(nn.Module):
    """Linear 2x2 merge: the four tokens of patch j, concatenated, -> merged token j. [B, N, dim] -> [B, n, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return self.proj(x[:, groups].flatten(2))


class PatchSplit(nn.Module):
    """Linear 2x2 split: merged token j -> the four tokens of patch j. [B, n, dim] -> [B, N, dim] (raster)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, ungroup: torch.Tensor) -> torch.Tensor:
        B, n, dim = x.shape
        return self.proj(x).view(B, n * 4, dim)[:, ungroup]  # patch-major order -> raster order


class PatchAttentionDown(nn.Module):
    """Attention resampling after the merge: merged token j attends to the four tokens of its own patch.

    coarse [B, n, dim], fine [B, N, dim] -> coarse + attn(norm(coarse_j), norm(fine[patch j])), [B, n, dim].
    """

    def __init__(self, dim: int, heads: int, norm: str):
        super().__init__()
        self.norm_q = make_norm(norm, dim)
        self.norm_kv = make_norm(norm, dim)
        self.attn = CrossAttention(dim, dim, heads)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        B, n, dim = coarse.shape
        q = coarse.reshape(B * n, 1, dim)
        patch = fine[:, groups].reshape(B * n, 4, dim)
        return coarse + self.attn(self.norm_q(q), self.norm_kv(patch)).view(B, n, dim)


class PatchAttentionUp(nn.Module):
    """Attention resampling after the split: each token of patch j attends to merged token j and the patch.

    fine [B, N, dim], coarse [B, n, dim] -> fine + attn(norm(fine_t), norm([coarse_j, fine[patch j]])), [B, N, dim].
    """

    def __init__(self, dim: int, heads: int, norm: str):
        super().__init__()
        self.norm_q = make_norm(norm, dim)
        self.norm_kv = make_norm(norm, dim)
        self.attn = CrossAttention(dim, dim, heads)

    def forward(
        self, fine: torch.Tensor, coarse: torch.Tensor, groups: torch.Tensor, ungroup: torch.Tensor
    ) -> torch.Tensor:
        B, n, dim = coarse.shape
        patch = fine[:, groups].reshape(B * n, 4, dim)
        context = torch.cat([coarse.reshape(B * n, 1, dim), patch], dim=1)
        out = patch + self.attn(self.norm_q(patch), self.norm_kv(context))
        return out.view(B, n * 4, dim)[:, ungroup]


class HourglassLevel(nn.Module):
    """One level on an h x w grid: pre blocks, then (merge, inner level, split, post blocks) unless it is the
    valley (``depths`` of length 1). x [B, h * w, dim] -> [B, h * w, dim]."""

    def __init__(
        self,
        dim: int,
        heads: int,
        depths: list[int],
        grid: tuple[int, int],
        scale: int,
        block_kwargs: dict,
        attn_resampling: bool,
        rope_base: float,
    ):
        super().__init__()
        h, w = grid
        self.grid = (h, w)
        self.is_valley = len(depths) == 1
        self.pre = nn.ModuleList(Block(dim, heads, **block_kwargs) for _ in range(depths[0]))
        cos, sin = level_rope(dim // heads, h, w, scale, rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        if self.is_valley:
            return
        if h % 2 or w % 2:
            raise TesseraError(
                f"hourglass level at grid {h} x {w} cannot merge 2x2 patches: the token grid must be divisible "
                f"by 2^{len(depths) // 2} (use fewer levels in model.depths)"
            )
        groups = patch_groups(h, w)
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("ungroup", torch.argsort(groups.reshape(-1)), persistent=False)
        self.merge = PatchMerge(dim)
        self.resample_down = PatchAttentionDown(dim, heads, block_kwargs["norm"]) if attn_resampling else None
        self.inner = HourglassLevel(
            dim, heads, depths[1:-1], (h // 2, w // 2), 2 * scale, block_kwargs, attn_resampling, rope_base
        )
        self.split = PatchSplit(dim)
        self.resample_up = PatchAttentionUp(dim, heads, block_kwargs["norm"]) if attn_resampling else None
        self.post = nn.ModuleList(Block(dim, heads, **block_kwargs) for _ in range(depths[-1]))

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        rope = (self.rope_cos, self.rope_sin)
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, False, rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._blocks(self.pre, x)
        if self.is_valley:
            return x
        coarse = self.merge(x, self.groups)
        if self.resample_down is not None:
            coarse = self.resample_down(coarse, x, self.groups)
        coarse = self.inner(coarse)
        fine = x + self.split(coarse, self.ungroup)
        if self.resample_up is not None:
            fine = self.resample_up(fine, coarse, self.groups, self.ungroup)
        return self._blocks(self.post, fine)


class HourglassTransformer(nn.Module):
    """Bidirectional hourglass over an h x w token grid: x [B, h * w, dim] (raster) -> [B, h * w, dim], normed.

    depths: odd-length list (see the module docstring). attn_resampling: add the patch attention resamplers
    after the linear merge and split. rope_base: the rotary base; positions are finest-grid cell coordinates.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        depths,
        grid: tuple[int, int],
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        attn_resampling: bool = True,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        depths = [int(d) for d in depths]
        if len(depths) % 2 == 0 or any(d < 0 for d in depths):
            raise TesseraError(
                f"model.depths={depths} must be an odd-length list of block counts >= 0, "
                "e.g. [2, 10, 2] (pre, valley, post) or [12] (no shortening)"
            )
        if dim % heads or (dim // heads) % 4:
            raise TesseraError(f"model.dim={dim} / model.heads={heads} must give a head width divisible by 4 "
                               "(2-D rotary splits each head into row and column halves)")
        self.depths = depths
        self.grid = tuple(int(s) for s in grid)
        block_kwargs = dict(mlp_ratio=mlp_ratio, mlp=mlp, norm=norm, dropout=dropout, attn_dropout=attn_dropout)
        self.root = HourglassLevel(dim, heads, depths, self.grid, 1, block_kwargs, attn_resampling, rope_base)
        self.norm_out = make_norm(norm, dim)

    def levels(self) -> list[HourglassLevel]:
        """The levels from the finest grid to the valley."""
        out, level = [], self.root
        while True:
            out.append(level)
            if level.is_valley:
                return out
            level = level.inner

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for level in self.levels():
            level.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = self.grid[0] * self.grid[1]
        if x.dim() != 3 or x.shape[1] != N:
            raise TesseraError(f"hourglass expects [B, {N}, dim] for its {self.grid} grid, got {list(x.shape)}")
        return self.norm_out(self.root(x))
