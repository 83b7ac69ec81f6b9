"""MAR: masked autoregressive generation of continuous tokens with a per-token diffusion head (DiffLoss).

Tokens: KL latents [B, c, H, W] are cut into p x p patches, N = (H/p) * (W/p) tokens of c*p*p channels in
raster order, each token's vector channel-major (c, then the p*p pixels).

Network (an MAE-style encoder/decoder, bidirectional):
    encoder  z_proj(tokens) with `buffer_size` slots in front that all hold the class vector; add the encoder
             positions, LayerNorm, then keep only the buffer and the known tokens -> blocks -> norm
    decoder  decoder_embed, scatter back into all buffer + N positions (mask_token where unknown), add the
             decoder positions -> blocks -> norm -> drop the buffer -> add the diffusion positions
             -> z [B, N, decoder_dim], one condition vector per token for DiffLoss
The class vector is a row of class_emb, or the learned null class ``fake_latent`` (unconditional model,
dropped labels in training with probability label_drop_prob, the unconditional half of CFG).

Training: each sample draws its own mask ratio from the normal centred at 1.0 (std 0.25) truncated to
[mask_ratio_min, 1] and its own random order; the first ceil(N * ratio) tokens of the order are masked (unknown).
Samples with different known counts are padded in the encoder, with an attention mask over the padding. DiffLoss
runs only on the masked tokens, each repeated diffusion_batch_mul times with independent (t, noise): this
equals the published loss, which runs the head on every token and then averages over the masked ones.

Parameter names follow the published model (``encoder_blocks.{i}.attn.qkv``, ``diffloss.net.*``, ...), so
released state dicts load key for key (models/convert/mar.py).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import TesseraError
from models.layers import Attention
from models.priors.common import class_labels
from models.priors.diffloss import DiffLoss, check_diffusion_steps
from models.registry import register_prior
from samplers.logits import check_sampling_kwargs
from samplers.mar import sample_mar


def sample_mask_ratios(n: int, low: float = 0.7, centre: float = 1.0, std: float = 0.25, high: float = 1.0,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n draws [n] of N(centre, std^2) truncated to [low, high], by inverting the normal CDF."""
    a = torch.special.ndtr(torch.tensor((low - centre) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - centre) / std, dtype=torch.float64))
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    ratios = centre + std * torch.special.ndtri(a.to(u.device) + u * (b - a).to(u.device))
    return ratios.clamp(low, high).float()


class FeedForward(nn.Module):
    """fc2(drop(gelu(fc1(x)))) with exact GELU, then dropout; [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class ViTBlock(nn.Module):
    """Pre-norm bidirectional block: x + attn(LN(x)), then x + mlp(LN(x)); [B, T, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


@register_prior("mar")
class MAR(nn.Module):
    """Masked autoregressive prior over patchified KL latents.

    Args (beyond the contract's token_shape and num_classes):
        patch_size: p; token channels = c * p * p.
        encoder_dim, encoder_depth, encoder_heads; decoder_dim, decoder_depth, decoder_heads (None: the encoder's).
        mlp_ratio, dropout (projections and MLP), attn_dropout.
        buffer_size: class-vector slots in front of the sequence (>= 1: they keep the encoder's input non-empty).
        label_drop_prob: training probability of replacing the class vector by the null class.
        mask_ratio_min, mask_ratio_std: the truncated normal of the training mask ratio (centre 1.0).
        diffloss_width, diffloss_depth: the DiffLoss MLP. diffusion_batch_mul: (t, noise) draws per masked token.
        num_timesteps: DiffLoss training schedule length.
    """

    accepts = ("kl",)
    conditions = ("none", "class")
    sampling_defaults = {"num_iter": 64, "num_sampling_steps": 100, "clip_denoised": 0.0}

    def __init__(self, *, token_shape, num_classes: int = 0, patch_size: int = 1, encoder_dim: int = 768,
                 encoder_depth: int = 12, encoder_heads: int = 12, decoder_dim: int | None = None,
                 decoder_depth: int | None = None, decoder_heads: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, attn_dropout: float = 0.1, buffer_size: int = 64, label_drop_prob: float = 0.1,
                 mask_ratio_min: float = 0.7, mask_ratio_std: float = 0.25, diffloss_width: int = 1024,
                 diffloss_depth: int = 3, diffusion_batch_mul: int = 4, num_timesteps: int = 1000,
                 embed_init_std: float = 0.02, grad_checkpointing: bool = False):
        super().__init__()
        token_shape = tuple(int(s) for s in token_shape)
        if len(token_shape) != 3:
            raise TesseraError(f"mar needs latents (c, h, w), got token_shape {token_shape}")
        c, H, W = token_shape
        if H % patch_size or W % patch_size:
            raise TesseraError(f"model.patch_size={patch_size} does not divide the latent grid {H}x{W}")
        if buffer_size < 1:
            raise TesseraError(f"model.buffer_size={buffer_size} must be >= 1 (the encoder needs an input token)")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise TesseraError(f"model.mask_ratio_min={mask_ratio_min} must be in (0, 1]")
        if diffusion_batch_mul < 1:
            raise TesseraError(f"model.diffusion_batch_mul={diffusion_batch_mul} must be >= 1")
        decoder_dim = decoder_dim or encoder_dim
        decoder_depth = decoder_depth or encoder_depth
        decoder_heads = decoder_heads or encoder_heads
        self.token_shape = token_shape
        self.patch_size = patch_size
        self.grid = (H // patch_size, W // patch_size)
        self.seq_len = self.grid[0] * self.grid[1]
        self.token_dim = c * patch_size * patch_size
        self.num_classes = num_classes
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min, self.mask_ratio_std = mask_ratio_min, mask_ratio_std
        self.diffusion_batch_mul = diffusion_batch_mul
        self.num_timesteps = num_timesteps
        self.grad_checkpointing = grad_checkpointing
        total = buffer_size + self.seq_len

        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes, encoder_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_dim))
        self.z_proj = nn.Linear(self.token_dim, encoder_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, encoder_dim))
        self.encoder_blocks = nn.ModuleList(ViTBlock(encoder_dim, encoder_heads, mlp_ratio, dropout, attn_dropout)
                                            for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, decoder_dim))
        self.decoder_blocks = nn.ModuleList(ViTBlock(decoder_dim, decoder_heads, mlp_ratio, dropout, attn_dropout)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_dim))
        self._init_weights(embed_init_std)
        self.diffloss = DiffLoss(self.token_dim, decoder_dim, diffloss_width, diffloss_depth, num_timesteps,
                                 grad_checkpointing)  # after _init_weights: the head keeps its own init

    def _init_weights(self, embed_init_std: float) -> None:
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=embed_init_std)
        if self.num_classes > 0:
            nn.init.normal_(self.class_emb.weight, std=embed_init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, c, H, W] -> [B, N, c*p*p] (raster order; each vector channel-major)."""
        if latents.dim() != 4 or tuple(latents.shape[1:]) != self.token_shape:
            raise TesseraError(f"mar expects latents [B, {', '.join(map(str, self.token_shape))}], got "
                               f"{list(latents.shape)}; check that the prior was built for this tokenizer")
        B, c = latents.shape[:2]
        p, (h, w) = self.patch_size, self.grid
        x = latents.reshape(B, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, h * w, c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, c*p*p] -> [B, c, H, W] (the inverse of patchify)."""
        B = x.shape[0]
        c = self.token_shape[0]
        p, (h, w) = self.patch_size, self.grid
        x = x.reshape(B, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, c, h * p, w * p)

    def class_vectors(self, cond: dict, batch: int, device, allow_missing: bool = False) -> torch.Tensor:
        """[B, encoder_dim]: class_emb rows, the null class where there is no label (or a dropped one)."""
        drop = self.label_drop_prob if self.training else 0.0
        labels = class_labels(cond, batch, self.num_classes, device, "mar", drop_prob=drop, allow_missing=allow_missing)
        null = self.fake_latent.expand(batch, -1)
        if self.num_classes == 0:
            return null
        vec = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where((labels == self.num_classes)[:, None], null.to(vec.dtype), vec)

    # ------------------------------------------------------------------ the transformer

    def _blocks(self, blocks, x, attn_mask):
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask)
        return x

    def token_conditions(self, x: torch.Tensor, mask: torch.Tensor, class_vec: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, N, token_dim], mask bool [B, N] (True = unknown), class vectors [B, D] -> z [B, N, D_dec].

        The encoder sees the buffer and the known tokens only; rows with fewer known tokens are padded and the
        padding is masked out of attention.
        """
        B, N = mask.shape
        buf = self.buffer_size
        h = self.z_proj(x)
        h = torch.cat([class_vec[:, None].to(h.dtype).expand(B, buf, -1), h], dim=1)
        h = self.z_proj_ln(h + self.encoder_pos_embed_learned)
        known = (~mask).sum(1)
        n_keep = int(known.max())
        keep_idx = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :n_keep]  # known positions first
        valid = torch.arange(n_keep, device=x.device)[None] < known[:, None]  # [B, n_keep]
        kept = torch.gather(h[:, buf:], 1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :buf], kept], dim=1)
        attn_mask = None
        if not bool(valid.all()):
            keys = torch.cat([valid.new_ones(B, buf), valid], dim=1)
            attn_mask = keys[:, None, None, :]
        h = self.encoder_norm(self._blocks(self.encoder_blocks, h, attn_mask))

        h = self.decoder_embed(h)
        full = self.mask_token.to(h.dtype).expand(B, buf + N + 1, -1).clone()  # slot buf + N catches the padding
        full[:, :buf] = h[:, :buf]
        dest = torch.where(valid, keep_idx + buf, torch.full_like(keep_idx, buf + N))
        full = full.scatter(1, dest[..., None].expand(-1, -1, h.shape[-1]), h[:, buf:])
        h = full[:, : buf + N] + self.decoder_pos_embed_learned
        h = self.decoder_norm(self._blocks(self.decoder_blocks, h, None))
        return h[:, buf:] + self.diffusion_pos_embed_learned

    # ------------------------------------------------------------------ training

    def random_masks(self, batch: int, device) -> torch.Tensor:
        """bool [B, N], True = masked: per sample a truncated-normal ratio and a random order."""
        N = self.seq_len
        ratios = sample_mask_ratios(batch, self.mask_ratio_min, 1.0, self.mask_ratio_std, device=device)
        num_masked = torch.ceil(ratios.double() * N).long().clamp(1, N)
        rank = torch.rand(batch, N, device=device).argsort(1).argsort(1)  # position of each token in the order
        return rank < num_masked[:, None]

    def forward(self, tokens: torch.Tensor, cond: dict) -> dict:
        """tokens [B, c, H, W] (scaled latents), cond {"class": [B]} or {} -> {"loss", "mse", "vb", "mask_ratio"}."""
        x = self.patchify(tokens.to(self.z_proj.weight.dtype))
        B = x.shape[0]
        mask = self.random_masks(B, x.device)
        z = self.token_conditions(x, mask, self.class_vectors(cond, B, x.device))
        target = x[mask].detach().repeat(self.diffusion_batch_mul, 1)
        out = self.diffloss(target, z[mask].repeat(self.diffusion_batch_mul, 1))
        return {**out, "mask_ratio": mask.float().mean().detach()}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, cond: dict, generators: list[torch.Generator], trace: bool = False, **sampling):
        """Draw len(generators) latents [B, c, H, W]; row b uses only generators[b].

        cond: {"class": [B]} ({} on a class-conditional model samples the null class).
        sampling: num_iter (transformer passes, <= N), num_sampling_steps (DiffLoss steps), temperature (on the
        per-step diffusion noise), cfg, cfg_schedule (constant | linear, see samplers.mar), clip_denoised (clamp
        DiffLoss's x0 prediction to +-this at every step; 0 = off, as published). top_k / top_p have no meaning
        for continuous tokens and must stay off.
        trace=True also returns the states [B, c, H, W] after each iteration (NaN = not generated), blank first.
        """
        s = check_sampling_kwargs(sampling, self.sampling_defaults)
        if s["top_k"] != 0 or s["top_p"] != 1.0:
            raise TesseraError("mar samples continuous tokens: sampling.top_k / top_p do not apply; leave them off")
        num_iter = s["num_iter"]
        if int(num_iter) != num_iter or not 1 <= int(num_iter) <= self.seq_len:
            raise TesseraError(f"sampling num_iter={num_iter} must be an integer in [1, {self.seq_len}] "
                               f"(the number of tokens)")
        steps = check_diffusion_steps(s["num_sampling_steps"], self.num_timesteps)
        clip = float(s["clip_denoised"])
        if not clip >= 0:
            raise TesseraError(f"sampling clip_denoised={s['clip_denoised']} must be >= 0 (0 = off)")
        if s["cfg"] != 1.0 and self.num_classes == 0:
            raise TesseraError(f"sampling cfg={s['cfg']} needs a class-conditional model; set sampling.cfg=1.0")
        B = len(generators)
        device = self.fake_latent.device
        class_vec = self.class_vectors(cond, B, device, allow_missing=True)
        null_vec = self.fake_latent.expand(B, -1) if s["cfg"] != 1.0 else None
        was_training = self.training
        self.eval()
        try:
            x, states = sample_mar(self, class_vec, null_vec, generators, num_iter=int(num_iter),
                                   num_sampling_steps=steps, temperature=s["temperature"], cfg=s["cfg"],
                                   cfg_schedule=s["cfg_schedule"], clip_denoised=clip, trace=trace)
        finally:
            self.train(was_training)
        tokens = self.unpatchify(x)
        return (tokens, [self.unpatchify(st) for st in states]) if trace else tokens

    # ------------------------------------------------------------------ optimisation

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled
        self.diffloss.net.grad_checkpointing = enabled

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """As published: decay every parameter with >= 2 dims (positions, mask token, class table included)
        except those of DiffLoss; no decay for 1-d parameters and biases."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and not name.startswith("diffloss.") else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

