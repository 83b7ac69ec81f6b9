"""GPT: a decoder-only transformer over raster-order code ids, conditioned by class prefix tokens.

Sequence for an h x w grid of N = h * w codes and n = num_cond_tokens prefix tokens:

    input   [c_1 .. c_n, z_0 .. z_{N-2}]          (n + N - 1 positions)
    target                [z_0 .. z_{N-1}]        (the outputs at positions n-1 .. n+N-2)

Codes and conditions live in separate embedding tables, so a class id never shares a row with a code id.
The condition table has num_classes + 1 rows; the last row is the learned null class, used for a dropped label
in training (probability class_dropout) and for the unconditional half of classifier-free guidance. An
unconditional model (num_classes = 0) has just that row: its learned start token(s). The output head and the
loss cover the K codes only.

Positions: ``learned`` (an absolute embedding per sequence position) or ``rope2d`` (2-D axial rotary on every
head: code z_j at grid cell (j // w, j % w); prefix tokens are not rotated).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import TesseraError
from models.layers import Block, KVCache, make_norm, rope_2d_grid
from models.priors.common import check_code_grid, class_labels, one_code_grid, weight_decay_groups
from models.registry import register_prior
from samplers.ar import sample_autoregressive
from samplers.logits import check_sampling_kwargs


@register_prior("gpt")
class GPT(nn.Module):
    accepts = ("vq", "rq")  # rq only with one code per cell (depth 1), checked in __init__
    conditions = ("none", "class")

    def __init__(
        self,
        *,
        token_shape,
        codebook_size: int,
        num_classes: int = 0,
        dim: int = 512,
        depth: int = 8,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        pos: str = "learned",
        class_dropout: float = 0.1,
        num_cond_tokens: int = 1,
        norm: str = "layernorm",
        mlp: str = "gelu",
        tie_embeddings: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        token_shape = tuple(int(s) for s in token_shape)
        one_code_grid(token_shape, "gpt")
        if pos not in ("learned", "rope2d"):
            raise TesseraError(f"model.pos='{pos}' is not one of: learned, rope2d")
        if dim % heads:
            raise TesseraError(f"model.dim={dim} is not divisible by model.heads={heads}")
        if pos == "rope2d" and (dim // heads) % 4:
            raise TesseraError(f"pos=rope2d needs dim / heads divisible by 4, got {dim}/{heads}")
        if num_cond_tokens < 1:
            raise TesseraError(f"model.num_cond_tokens={num_cond_tokens} must be >= 1")
        if not 0.0 <= class_dropout < 1.0:
            raise TesseraError(f"model.class_dropout={class_dropout} must be in [0, 1)")
        self.token_shape = token_shape
        self.h, self.w = token_shape[:2]
        self.num_tokens = self.h * self.w
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.num_cond_tokens = num_cond_tokens
        self.class_dropout = class_dropout
        self.dim = dim
        self.pos = pos
        self.grad_checkpointing = grad_checkpointing
        self.seq_len = num_cond_tokens + self.num_tokens - 1  # longest input

        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.cond_emb = nn.Embedding(num_classes + 1, num_cond_tokens * dim)  # row num_classes = null / start
        if pos == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        else:
            angles = torch.zeros(self.seq_len, dim // heads // 2, dtype=torch.float64)
            angles[num_cond_tokens:] = rope_2d_grid(dim // heads, self.h, self.w)[: self.num_tokens - 1]
            self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, mlp=mlp, norm=norm, dropout=dropout, attn_dropout=attn_dropout)
            for _ in range(depth)
        )
        self.norm_f = make_norm(norm, dim)
        self.head = nn.Linear(dim, codebook_size, bias=False)
        self._init_weights(depth, tie_embeddings)

    def _init_weights(self, depth: int, tie_embeddings: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02 / math.sqrt(2 * depth))
        if self.pos == "learned":
            nn.init.normal_(self.pos_emb, std=0.02)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.zeros_(self.head.weight)

    # ------------------------------------------------------------------ inputs

    def _codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] (or [B, h, w, 1]) -> codes [B, N], checked."""
        return check_code_grid(tokens, (self.h, self.w), self.codebook_size, "gpt")

    def class_ids(self, cond: dict, batch: int, device, allow_missing: bool = False) -> torch.Tensor:
        """Condition-table rows [B]: cond["class"], or the null row num_classes (dropped in training for CFG)."""
        drop = self.class_dropout if self.training else 0.0
        return class_labels(cond, batch, self.num_classes, device, "gpt", drop_prob=drop, allow_missing=allow_missing)

    def _embed(self, ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Condition rows [B] and codes [B, t] -> [B, n + t, dim]."""
        prefix = self.cond_emb(ids).view(ids.shape[0], self.num_cond_tokens, self.dim)
        return torch.cat([prefix, self.tok_emb(codes)], dim=1)

    # ------------------------------------------------------------------ transformer

    def _transformer(
        self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """x [B, T, dim] at sequence positions [start, start + T) -> normalised hidden states [B, T, dim]."""
        T = x.shape[1]
        if start + T > self.seq_len:
            raise TesseraError(f"sequence of {start + T} positions exceeds the model's {self.seq_len}")
        rope = None
        if self.pos == "learned":
            x = x + self.pos_emb[:, start : start + T]
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, True, rope, use_reentrant=False)
            else:
                x = blk(x, causal=True, rope=rope, cache=caches[i] if caches is not None else None)
        return self.norm_f(x)

    def logits(self, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: codes [B, N], condition rows [B] -> [B, N, K] ([:, j] predicts code j)."""
        h = self._transformer(self._embed(ids, codes[:, :-1]))
        return self.head(h[:, self.num_cond_tokens - 1 :])

    def forward(self, tokens: torch.Tensor, cond: dict) -> dict:
        """tokens [B, h, w], cond {"class": [B]} or {} -> {"loss", "nll", "acc"}; CE over the K codes."""
        codes = self._codes(tokens)
        ids = self.class_ids(cond, codes.shape[0], codes.device)
        logits = self.logits(codes, ids)
        loss = F.cross_entropy(logits.float().reshape(-1, self.codebook_size), codes.reshape(-1))
        acc = (logits.argmax(-1) == codes).float().mean()
        return {"loss": loss, "nll": loss.detach(), "acc": acc.detach()}

    # ------------------------------------------------------------------ sampling

    def new_kv_caches(self) -> list[KVCache]:
        return [KVCache(self.seq_len) for _ in self.blocks]

    def next_logits(
        self, ids: torch.Tensor, codes: torch.Tensor, caches: list[KVCache] | None
    ) -> torch.Tensor:
        """Logits [R, K] of the code after ``codes`` [R, t] (samplers.ar); runs only uncached positions."""
        if caches is None or caches[0].length == 0:
            x, start = self._embed(ids, codes), 0
        else:
            start = caches[0].length
            x = self.tok_emb(codes[:, start - self.num_cond_tokens :])
        h = self._transformer(x, start, caches)
        return self.head(h[:, -1])

    @torch.no_grad()
    def sample(self, cond: dict, generators: list[torch.Generator], trace: bool = False, **sampling):
        """Draw len(generators) token grids [B, h, w]; row b uses only generators[b].

        cond: {"class": [B]} ({} on a class-conditional model samples the null class, i.e. unconditionally).
        sampling: temperature, top_k, top_p, cfg, cfg_schedule, use_kv_cache (see SAMPLING_DEFAULTS).
        trace=True also returns one [B, h, w] state per generated row (-1 = not generated yet), blank first.
        """
        s = check_sampling_kwargs(sampling)
        if s["cfg"] != 1.0 and self.num_classes == 0:
            raise TesseraError(
                f"sampling cfg={s['cfg']} needs a class-conditional model; set sampling.cfg=1.0"
            )
        B = len(generators)
        device = self.tok_emb.weight.device
        ids = self.class_ids(cond, B, device, allow_missing=True)
        null = torch.full_like(ids, self.num_classes) if s["cfg"] != 1.0 else None
        was_training = self.training
        self.eval()
        try:
            codes, states = sample_autoregressive(
                self,
                ids,
                null,
                self.num_tokens,
                generators,
                temperature=s["temperature"],
                top_k=s["top_k"],
                top_p=s["top_p"],
                cfg=s["cfg"],
                cfg_schedule=s["cfg_schedule"],
                use_kv_cache=s["use_kv_cache"],
                trace_every=self.w if trace else 0,
            )
        finally:
            self.train(was_training)
        shape = (B, *self.token_shape)
        tokens = codes.view(shape)
        return (tokens, [st.view(shape) for st in states]) if trace else tokens

    # ------------------------------------------------------------------ optimisation

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
        self.grad_checkpointing = enabled

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return weight_decay_groups(self, weight_decay)
