"""SUNDAE: a step-unrolled denoising autoencoder over a token grid, with a 2-D hourglass transformer.

Training, for clean codes x [B, N] (N = h * w cells, K codes):

    alpha ~ U(0, 1) per sample; each code is replaced by a uniform random code with probability alpha -> z_0
    for t = 1 .. unroll_steps:  logits_t = f(z_{t-1}, class);  z_t ~ softmax(logits_t)  (detached, temperature 1)
    loss = mean over t of CE(logits_t, x), over every position (corrupted or not)

so the network learns to denoise both random corruption and its own samples. Sampling (samplers.sundae)
starts from uniform random codes and resamples a proportion of them per step.

Conditioning (``condition``: auto | class | none; auto = class when the data set has classes): a class
embedding (num_classes + 1 rows; the last is the null class) is added to every token embedding. In training a
label becomes the null class with probability class_dropout, so sampling can use classifier-free guidance
(sampling.cfg). An unconditional model (condition none) has no class table and ignores any "class" in cond:
a labelled data set such as shapes still hands its labels to every prior.

Inpainting: ``sample(..., known_tokens=[B, h, w], known_mask=bool [B, h, w])`` (keyword arguments, so a
prior without inpainting rejects them as unknown sampling options): known cells keep their codes bit for bit.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError
from models.layers import Block
from models.priors.common import check_code_grid, class_labels, one_code_grid, weight_decay_groups
from models.priors.hourglass import HourglassTransformer
from models.registry import register_prior
from samplers.logits import cfg_combine, cfg_scale_at, check_sampling_kwargs
from samplers.sundae import SUNDAE_SAMPLING_DEFAULTS, SundaeResult, sample_sundae, sundae_options


def corrupt(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, N] -> (corrupted [B, N], alpha [B]): per sample rate alpha ~ U(0, 1), each code replaced by a
    uniform random code with probability alpha (the replacement may equal the original)."""
    B, N = codes.shape
    alpha = torch.rand(B, device=codes.device)
    replace = torch.rand(B, N, device=codes.device) < alpha[:, None]
    noise = torch.randint(codebook_size, (B, N), device=codes.device)
    return torch.where(replace, noise, codes), alpha


@register_prior("sundae")
class SUNDAE(nn.Module):
    accepts = ("vq", "rq")  # rq only with one code per cell (depth 1), checked in __init__
    conditions = ("none", "class")
    supports_inpainting = True
    sampling_defaults = SUNDAE_SAMPLING_DEFAULTS

    def __init__(
        self,
        *,
        token_shape,
        codebook_size: int,
        num_classes: int = 0,
        condition: str = "auto",
        dim: int = 512,
        heads: int = 8,
        depths=(2, 8, 2),
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        attn_resampling: bool = True,
        rope_base: float = 10000.0,
        unroll_steps: int = 2,
        class_dropout: float = 0.1,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        token_shape = tuple(int(s) for s in token_shape)
        one_code_grid(token_shape, "sundae")
        if int(unroll_steps) != unroll_steps or unroll_steps < 1:
            raise TesseraError(f"model.unroll_steps={unroll_steps} must be an integer >= 1 (published: 2 or 3)")
        if condition == "auto":
            condition = "class" if num_classes > 0 else "none"
        if condition not in ("class", "none"):
            raise TesseraError(f"model.condition='{condition}' is not one of: auto, class, none")
        if condition == "class" and num_classes < 1:
            raise TesseraError("model.condition=class but the data has no classes; use condition: none")
        if not 0.0 <= class_dropout < 1.0:
            raise TesseraError(f"model.class_dropout={class_dropout} must be in [0, 1)")
        self.token_shape = token_shape
        self.h, self.w = token_shape[:2]
        self.num_tokens = self.h * self.w
        self.codebook_size = codebook_size
        self.condition = condition
        self.num_classes = int(num_classes) if condition == "class" else 0
        self.class_dropout = class_dropout
        self.unroll_steps = int(unroll_steps)

        self.tok_emb = nn.Embedding(codebook_size, dim)
        self.class_emb = nn.Embedding(self.num_classes + 1, dim) if self.num_classes else None  # last row: null
        self.transformer = HourglassTransformer(
            dim, heads, depths, (self.h, self.w), mlp_ratio=mlp_ratio, dropout=dropout, attn_dropout=attn_dropout,
            norm=norm, mlp=mlp, attn_resampling=attn_resampling, rope_base=rope_base,
        )
        self.head = nn.Linear(dim, codebook_size)
        self._init_weights()
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        blocks = [m for m in self.modules() if isinstance(m, Block)]
        for blk in blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * max(1, len(blocks))))
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02 / math.sqrt(2 * max(1, len(blocks))))
        nn.init.zeros_(self.head.weight)
        if self.class_emb is not None:  # start as the unconditional model: a random class vector added to every
            nn.init.zeros_(self.class_emb.weight)  # token slows early training (shapes: CE 4.94 vs 4.58 at step 150)

    # ------------------------------------------------------------------ inputs

    def _codes(self, tokens: torch.Tensor, what: str = "tokens") -> torch.Tensor:
        """tokens [B, h, w] (or [B, h, w, 1]) -> codes [B, N], checked."""
        return check_code_grid(tokens, (self.h, self.w), self.codebook_size, "sundae", what)

    def class_ids(self, cond: dict, batch: int, device, allow_missing: bool = False) -> torch.Tensor | None:
        """Class-table rows [B] (null row num_classes when dropped or missing); None if unconditional."""
        if self.class_emb is None:
            return None
        drop = self.class_dropout if self.training else 0.0
        return class_labels(cond, batch, self.num_classes, device, "sundae", drop_prob=drop,
                            allow_missing=allow_missing)

    # ------------------------------------------------------------------ network

    def logits(self, codes: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """codes [B, N], class rows [B] (or None) -> logits [B, N, K] for every position."""
        x = self.tok_emb(codes)
        if ids is not None:
            x = x + self.class_emb(ids)[:, None]
        return self.head(self.transformer(x))

    def forward(self, tokens: torch.Tensor, cond: dict) -> dict:
        """tokens [B, h, w], cond {"class": [B]} or {} -> {"loss", "acc", "ce_first", "ce_last"}.

        loss: the mean over the unroll steps of the cross-entropy against the clean codes at every position.
        acc: argmax accuracy over all steps and positions.
        """
        codes = self._codes(tokens)
        ids = self.class_ids(cond, codes.shape[0], codes.device)
        z, _ = corrupt(codes, self.codebook_size)
        losses, correct = [], 0.0
        for t in range(self.unroll_steps):
            logits = self.logits(z, ids)
            losses.append(F.cross_entropy(logits.float().reshape(-1, self.codebook_size), codes.reshape(-1)))
            with torch.no_grad():
                correct = correct + (logits.argmax(-1) == codes).float().mean()
                if t + 1 < self.unroll_steps:
                    probs = logits.float().softmax(-1).reshape(-1, self.codebook_size)
                    z = torch.multinomial(probs, 1).view_as(codes)
        loss = torch.stack(losses).mean()
        return {"loss": loss, "acc": correct / self.unroll_steps, "ce_first": losses[0].detach(),
                "ce_last": losses[-1].detach()}

    # ------------------------------------------------------------------ sampling

    def run_sampler(
        self,
        cond: dict,
        generators: list[torch.Generator],
        trace: bool = False,
        known_tokens: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        **sampling,
    ) -> SundaeResult:
        """The full sampling record (codes [B, N], steps run per sample, trace, schedules); see ``sample``."""
        s = sundae_options(check_sampling_kwargs(sampling, self.sampling_defaults))
        B = len(generators)
        device = self.tok_emb.weight.device
        guided = s["cfg"] != 1.0
        if guided and self.class_emb is None:
            raise TesseraError(f"sampling cfg={s['cfg']} needs a class-conditional model; set sampling.cfg=1.0")
        ids = self.class_ids(cond, B, device, allow_missing=True)
        known_codes = None
        if (known_tokens is None) != (known_mask is None):
            raise TesseraError("inpainting needs both known_tokens and known_mask")
        if known_mask is not None:
            known_codes = self._codes(known_tokens.to(device), "known_tokens")
            if known_mask.dim() == 4 and known_mask.shape[-1] == 1:
                known_mask = known_mask[..., 0]
            if tuple(known_mask.shape) != (B, self.h, self.w) or known_codes.shape[0] != B:
                raise TesseraError(
                    f"known_tokens / known_mask must be [{B}, {self.h}, {self.w}] (one row per sample), got "
                    f"{list(known_tokens.shape)} / {list(known_mask.shape)}"
                )
            known_mask = known_mask.reshape(B, -1).to(device=device, dtype=torch.bool)

        def logits_fn(codes, rows, step):
            rows_ids = ids[rows] if ids is not None else None
            if not guided:
                return self.logits(codes, rows_ids)
            null = torch.full_like(rows_ids, self.num_classes)
            cond_logits, uncond_logits = self.logits(codes.repeat(2, 1), torch.cat([rows_ids, null])).chunk(2)
            return cfg_combine(cond_logits, uncond_logits, cfg_scale_at(step, s["steps"], s["cfg"], s["cfg_schedule"]))

        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return sample_sundae(
                    logits_fn, generators, self.num_tokens, self.codebook_size,
                    steps=s["steps"], temperature=s["temperature"], temperature_end=s["temperature_end"],
                    proportion=s["proportion"], proportion_end=s["proportion_end"], min_steps=s["min_steps"],
                    early_stop=s["early_stop"], top_k=s["top_k"], top_p=s["top_p"], known_codes=known_codes,
                    known_mask=known_mask, device=device, trace=trace,
                )
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(
        self,
        cond: dict,
        generators: list[torch.Generator],
        trace: bool = False,
        known_tokens: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        **sampling,
    ):
        """Draw len(generators) token grids [B, h, w] (or [B, h, w, 1]); row b uses only generators[b].

        cond: {"class": [B]} ({} on a class-conditional model samples the null class, i.e. unconditionally).
        sampling: steps, temperature, temperature_end, proportion, proportion_end, min_steps, early_stop,
        top_k, top_p, cfg, cfg_schedule (see samplers.sundae and samplers.logits).
        known_tokens [B, h, w] + known_mask bool [B, h, w]: inpainting; known cells never change.
        trace=True also returns the [B, h, w] grid after every step (the random start first).
        """
        result = self.run_sampler(cond, generators, trace, known_tokens, known_mask, **sampling)
        shape = (len(generators), *self.token_shape)
        tokens = result.codes.view(shape)
        return (tokens, [st.view(shape) for st in result.states]) if trace else tokens

    # ------------------------------------------------------------------ optimisation

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
        self.transformer.set_grad_checkpointing(enabled)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return weight_decay_groups(self, weight_decay)
