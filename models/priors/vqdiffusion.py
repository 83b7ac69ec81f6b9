"""VQ-Diffusion: a discrete diffusion over VQ code ids, with an x0-predicting transformer.

State space: K codes and one [MASK] class, index K. Time runs t = 0 (data) .. T (all masked). One forward
step t-1 -> t keeps a code with probability alpha_t + beta_t, moves it to each other code with beta_t,
masks it with gamma_t (alpha_t + K beta_t + gamma_t = 1); [MASK] is absorbing. The schedule is given by
the cumulative products, linear in t = 1..T (t = 0 is the identity):

    abar_t = prod alpha,   gbar_t = 1 - prod (1 - gamma),   bbar_t = (1 - abar_t - gbar_t) / K
    q(x_t = k | x_0 = k) = abar_t + bbar_t,  q(x_t = j != k | x_0 = k) = bbar_t,  q(x_t = MASK | x_0) = gbar_t

``schedule: mask`` is the released one (abar 0.99999 -> 0.000009, gbar 0.000009 -> 0.99999, so K bbar = 1e-6:
practically a pure mask diffusion); ``schedule: mask_and_replace`` is the paper's (gbar -> 0.9, K bbar -> 0.1).
The chain from s to t > s is again mask-and-replace, with abar_t / abar_s and (1 - gbar_t) / (1 - gbar_s)
as its keep and not-mask products, which gives the exact posterior q(x_s | x_t, x_0) for any jump (the
fast sampler). Every probability is handled in log space (float64 when sampling, float32 in the loss).

Network: pre-norm blocks of [adaLN(t) -> self-attention], [adaLN(t) -> cross-attention over frozen CLIP
text features] (text models), [LayerNorm or class-adaLN -> MLP]; learned row + column position tables; the
head predicts p(x_0 | x_t) over the K codes. Module names follow the released checkpoints, so their weights
map key for key (models/convert/vqdiffusion.py).

Loss (per token): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (the decoder NLL at t = 1) plus
aux_weight * (2 - (t-1)/T if adaptive_aux) * cross-entropy of x_0, both divided by the probability p(t) of
the drawn t: uniform until every t was seen ``importance_warmup`` times, then p(t) ~ sqrt(EMA of L_t^2).

Code remapping: ``remap`` names a ``codes_used.npy`` (data.cache.write_codes_used): the prior then works
on the K' codes the data set uses; tokens in and out are still the tokenizer's own ids.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine import dist
from engine.errors import TesseraError
from models.conditioners import ClassEmbedding, TextEncoderHandle, get_text_encoder
from models.priors.common import check_code_grid, weight_decay_groups
from models.registry import register_prior
from samplers.logits import check_sampling_kwargs, top_k_filter, top_p_filter
from samplers.vqdiffusion import SAMPLERS, reverse_fixed_budget, reverse_posterior, visited_steps

SCHEDULES = {  # cumulative (abar at t = 1, abar at T), (gbar at t = 1, gbar at T)
    "mask": ((0.99999, 0.000009), (0.000009, 0.99999)),
    "mask_and_replace": ((0.99999, 0.000009), (0.000009, 0.9)),
}
LOG_MIN = -70.0  # floor of the network's log-probabilities (as released)


# ============================================================================ the discrete diffusion


class MaskReplaceDiffusion(nn.Module):
    """Schedule tables and the closed forms; ``num_codes`` K (mask = K), ``num_steps`` T.

    Tables float64; distributions are log-probabilities [B, N, K + 1] (computed in their dtype), time t a
    LongTensor [B].
    """

    def __init__(self, num_codes: int, num_steps: int = 100, schedule="mask"):
        super().__init__()
        if isinstance(schedule, str):
            if schedule not in SCHEDULES:
                raise TesseraError(f"model.schedule='{schedule}' is not one of: {', '.join(SCHEDULES)} "
                                   "(or a dict with alpha_bar: [first, last] and gamma_bar: [first, last])")
            a_ends, g_ends = SCHEDULES[schedule]
        else:
            try:
                a_ends, g_ends = tuple(schedule["alpha_bar"]), tuple(schedule["gamma_bar"])
            except (KeyError, TypeError) as e:
                raise TesseraError("a custom model.schedule needs alpha_bar: [first, last] and "
                                   "gamma_bar: [first, last]") from e
        K, T = int(num_codes), int(num_steps)
        if T < 2 or K < 2:
            raise TesseraError(f"vqdiffusion needs num_steps >= 2 and >= 2 codes, got {T}, {K}")
        self.K, self.T = K, T
        cpu = dict(dtype=torch.float64, device="cpu")  # also when models are built under a meta device
        frac = torch.arange(T, **cpu) / (T - 1)
        abar = torch.cat([torch.ones(1, **cpu), a_ends[0] + frac * (a_ends[1] - a_ends[0])])
        gbar = torch.cat([torch.zeros(1, **cpu), g_ends[0] + frac * (g_ends[1] - g_ends[0])])
        bbar = (1 - abar - gbar) / K
        alpha = abar[1:] / abar[:-1]
        gamma = 1 - (1 - gbar[1:]) / (1 - gbar[:-1])
        beta = (1 - alpha - gamma) / K
        if not (abar[1:] > 0).all() or not (beta > 0).all() or not (gamma >= 0).all() or not (bbar[1:] > 0).all():
            raise TesseraError(f"schedule {schedule} does not give valid per-step probabilities "
                               "(need abar > 0, gamma >= 0 and beta > 0 at every step)")
        for name, v in (("log_abar", abar), ("log_bbar", bbar), ("log_gbar", gbar), ("log_1m_gbar", 1 - gbar)):
            self.register_buffer(name, v.log(), persistent=False)
        self.register_buffer("gbar", gbar, persistent=False)

    def _at(self, table: torch.Tensor, t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        return table[t][:, None, None].to(dtype)  # [B, 1, 1]

    def jump(self, s: torch.Tensor, t: torch.Tensor, dtype=torch.float64):
        """log (alpha, beta, gamma) [B, 1, 1] of the one-jump transition from step s to step t > s."""
        log_a = self._at(self.log_abar, t) - self._at(self.log_abar, s)
        keep = torch.exp(self._at(self.log_1m_gbar, t) - self._at(self.log_1m_gbar, s))  # 1 - gamma
        gamma = (1 - keep).clamp_min(0)
        beta = ((keep - log_a.exp()) / self.K).clamp_min(0)
        return log_a.to(dtype), beta.log().to(dtype), gamma.log().to(dtype)

    def q_xt(self, log_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_0) for a distribution log_x0 [B, N, K+1] (one-hot or not) -> [B, N, K+1]."""
        K, dt = self.K, log_x0.dtype
        log_codes = torch.logsumexp(log_x0[..., :K], dim=-1, keepdim=True)  # mass on the codes
        codes = torch.logaddexp(log_x0[..., :K] + self._at(self.log_abar, t, dt),
                                self._at(self.log_bbar, t, dt) + log_codes)
        mask = torch.logaddexp(log_x0[..., K:], self._at(self.log_gbar, t, dt) + log_codes)
        return torch.cat([codes, mask], dim=-1)

    def sample_xt(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for code ids x0 [B, N] (torch's global RNG; training only) -> [B, N]."""
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device)
        gbar = self.gbar[t][:, None]
        replace = (self.K * self.log_bbar[t].exp())[:, None]  # a uniformly random code (possibly itself)
        random_codes = torch.randint(0, self.K, x0.shape, device=x0.device)
        x = torch.where(u < gbar + replace, random_codes, x0)
        return torch.where(u < gbar, torch.full_like(x0, self.K), x)

    def posterior(self, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log sum_k p(x_0 = k) q(x_s | x_t, x_0 = k), s < t -> [B, N, K+1].

        log_x0 [B, N, K+1] (p(x_0); its mask column is ignored), x_t [B, N] ids (K = mask), t, s [B].
        Bayes per candidate: w_k = p_k / q(x_t | x_0 = k) (normalised, normaliser Z kept), pushed through
        the cumulative transition to s, times the jump likelihood q(x_t | x_s), times Z. The result sums to
        the mass of p over the codes (1 unless p was truncated).
        """
        K, dt = self.K, log_x0.dtype
        is_mask = (x_t == K)[..., None]  # [B, N, 1]
        at_j = F.one_hot(x_t.clamp_max(K - 1), K).bool() & ~is_mask  # [B, N, K]: code i == x_t
        log_a_t, log_b_t, log_g_t = (self._at(v, t, dt) for v in (self.log_abar, self.log_bbar, self.log_gbar))
        # q(x_t | x_0 = k): abar_t + bbar_t at k = x_t, bbar_t elsewhere, gbar_t for x_t = MASK
        log_like = torch.where(at_j, torch.logaddexp(log_a_t, log_b_t), torch.where(is_mask, log_g_t, log_b_t))
        log_w = log_x0[..., :K] - log_like
        log_z = torch.logsumexp(log_w, dim=-1, keepdim=True)
        # through the cumulative transition to s (the candidates are codes: no mass on x_0 = MASK)
        log_a_s, log_b_s, log_g_s = (self._at(v, s, dt) for v in (self.log_abar, self.log_bbar, self.log_gbar))
        at_s = torch.logaddexp(log_w - log_z + log_a_s, log_b_s)
        # times the jump likelihood q(x_t | x_s = i), and Z
        log_a, log_b, log_g = self.jump(s, t, dt)
        lik = torch.where(at_j, torch.logaddexp(log_a, log_b), torch.where(is_mask, log_g, log_b))
        codes = at_s + lik + log_z
        mask = torch.where(is_mask, log_g_s + log_z, torch.full_like(log_z, -math.inf))
        return torch.cat([codes, mask], dim=-1)

    def true_posterior_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
        """q(x_s | x_t, x_0) for code ids x0 in closed form: at most four distinct values per position.

        -> (q_x0, q_xt, q_other, n_other, q_mask), each [B, N] float64: the probability of x_s = x_0, of
        x_s = x_t (when x_t is a code other than x_0; else 0), of each of the n_other remaining codes, of MASK.
        """
        K = self.K
        A_s, B_s, G_s = (torch.exp(v[s])[:, None] for v in (self.log_abar, self.log_bbar, self.log_gbar))
        A_t, B_t, G_t = (torch.exp(v[t])[:, None] for v in (self.log_abar, self.log_bbar, self.log_gbar))
        log_a, log_b, log_g = (v[:, :, 0] for v in self.jump(s, t))
        a, b, g = log_a.exp(), log_b.exp(), log_g.exp()
        is_mask, same = x_t == K, x_t == x0
        zero = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)
        # x_t = MASK: x_s = x_0 w.p. (A_s + B_s) g / G_t, another code B_s g / G_t, MASK G_s / G_t
        # x_t = x_0: (A_s + B_s)(a + b) / (A_t + B_t), others B_s b / (A_t + B_t)
        # x_t = j != x_0: x_0 (A_s + B_s) b / B_t, j B_s (a + b) / B_t, others B_s b / B_t
        q_x0 = torch.where(is_mask, (A_s + B_s) * g / G_t,
                           torch.where(same, (A_s + B_s) * (a + b) / (A_t + B_t), (A_s + B_s) * b / B_t))
        q_xt = torch.where(is_mask | same, zero, B_s * (a + b) / B_t + zero)
        q_other = torch.where(is_mask, B_s * g / G_t, torch.where(same, B_s * b / (A_t + B_t), B_s * b / B_t))
        n_other = torch.where(is_mask | same, zero + (K - 1), zero + (K - 2))
        q_mask = torch.where(is_mask, G_s / G_t + zero, zero)
        return q_x0, q_xt, q_other, n_other, q_mask

    def kl_and_nll(self, log_px: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
        """Loss terms of one reverse step s < t, for the model's log p(x_0) over the codes [B, N, K]
        (normalised) and the data codes x0 [B, N]:

        -> (KL(q(x_s | x_t, x_0) || p(x_s | x_t)) [B, N], log p(x_s = x_0 | x_t) [B, N]).

        Same quantities as ``posterior`` + ``categorical_kl``, in a few passes over the codes: the likelihood
        q(x_t | x_0 = i) and the jump likelihood q(x_t | x_s = i) take one value at i = x_t and another
        everywhere else, and the true posterior has at most four distinct values (true_posterior_terms), so
        the KL needs the model's log-probabilities only at x_0, at x_t, and summed over the codes.
        """
        K = self.K
        col = lambda v, i: v[i][:, None].to(log_px.dtype)  # noqa: E731  per-sample scalar [B, 1]
        lg_t, lb_t, la_t = col(self.log_gbar, t), col(self.log_bbar, t), col(self.log_abar, t)
        lg_s, lb_s, la_s = col(self.log_gbar, s), col(self.log_bbar, s), col(self.log_abar, s)
        log_a, log_b, log_g = (v[:, :, 0] for v in self.jump(s, t, log_px.dtype))
        is_mask = x_t == K
        code = ~is_mask
        j = x_t.clamp_max(K - 1)
        lp_j = log_px.gather(-1, j[..., None]).squeeze(-1)
        like_j = torch.logaddexp(la_t, lb_t)  # q(x_t = j | x_0 = j); q(x_t = j | x_0 = i != j) = bbar_t
        like_o = torch.where(is_mask, lg_t, lb_t)  # the likelihood of every candidate other than j
        # Z = sum_i p_i / q(x_t | x_0 = i), with the mass off j summed directly (1 - p_j would round away)
        lse_off_j = torch.logsumexp(log_px.scatter(-1, j[..., None], -math.inf), dim=-1)
        log_z = torch.where(is_mask, torch.logsumexp(log_px, -1) - lg_t,
                            torch.logaddexp(lse_off_j - like_o, lp_j - like_j))
        # log(w_i abar_s + bbar_s) for the normalised weights w, first with like_o at every i ...
        at_s = torch.logaddexp(log_px + (la_s - like_o - log_z)[..., None], lb_s[..., None])
        # ... then the entry i = j of a code x_t, whose likelihood is like_j
        at_s_j = torch.logaddexp(lp_j - like_j - log_z + la_s, lb_s)
        lik_o = torch.where(is_mask, log_g, log_b)
        lik_j = torch.logaddexp(log_a, log_b)
        hit = code & (x0 == j)
        lp_x0 = torch.where(hit, at_s_j + lik_j, at_s.gather(-1, x0[..., None]).squeeze(-1) + lik_o) + log_z
        lp_xt = at_s_j + lik_j + log_z
        fix_j = torch.where(code, at_s_j - at_s.gather(-1, j[..., None]).squeeze(-1) + lik_j - lik_o,
                            torch.zeros_like(lp_j))
        lp_codes = at_s.sum(-1) + K * (lik_o + log_z) + fix_j
        lp_mask = lg_s + log_z
        q_x0, q_xt, q_other, n_other, q_mask = (q.to(log_px.dtype) for q in self.true_posterior_terms(x0, x_t, t, s))
        zero = torch.zeros_like(lp_j)
        lp_others = lp_codes - lp_x0 - torch.where(q_xt > 0, lp_xt, zero)
        neg_entropy = (torch.xlogy(q_x0, q_x0) + torch.xlogy(q_xt, q_xt) + n_other * torch.xlogy(q_other, q_other)
                       + torch.xlogy(q_mask, q_mask))
        cross = (q_x0 * lp_x0 + torch.where(q_xt > 0, q_xt * lp_xt, zero)
                 + torch.where(q_other > 0, q_other * lp_others, zero)
                 + torch.where(q_mask > 0, q_mask * lp_mask, zero))
        return neg_entropy - cross, lp_x0


def log_onehot(x: torch.Tensor, num_classes: int, dtype=torch.float64) -> torch.Tensor:
    """ids [B, N] -> log one-hot [B, N, num_classes] (0 and -inf)."""
    out = torch.full((*x.shape, num_classes), -math.inf, dtype=dtype, device=x.device)
    return out.scatter_(-1, x[..., None], 0.0)


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, with 0 log 0 = 0 -> [...]."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


# ============================================================================ the network


def gelu2(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU, x * sigmoid(1.702 x), of the released models."""
    return x * torch.sigmoid(1.702 * x)


class GELU2(nn.Module):
    def forward(self, x):
        return gelu2(x)


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine) modulated by an embedded id: x [B, N, D], ids [B] -> norm(x) (1 + scale) + shift.

    The id is a diffusion step (a plain table of ``rows``) or a class (a ClassEmbedding with a null row).
    """

    def __init__(self, dim: int, rows: int, class_null: str | None = None):
        super().__init__()
        self.emb = nn.Embedding(rows, dim) if class_null is None else ClassEmbedding(rows, dim, class_null)
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(self.emb(ids))).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention [B, N, D] -> [B, N, D] (separate key/query/value/proj linears)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise TesseraError(f"model.dim={dim} is not divisible by model.heads={heads}")
        self.heads = heads
        self.key = nn.Linear(context_dim or dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(context_dim or dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        src = x if context is None else context
        B, N, D = x.shape
        split = lambda y: y.view(B, y.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(src)), split(self.value(src)))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class ConvMLP(nn.Module):
    """3x3 conv MLP on the token grid: [B, h*w, D] -> [B, h*w, D] (the class/unconditional released models)."""

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], act):
        super().__init__()
        self.grid, self.act = grid, act
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h, w = self.grid
        y = x.transpose(1, 2).reshape(B, D, h, w)
        y = self.conv2(self.act(self.conv1(y)))
        return y.flatten(2).transpose(1, 2)


class Block(nn.Module):
    """x += attn(adaLN_t(x)); [x += cross(adaLN'_t(x), text)]; x += mlp(LayerNorm or class-adaLN(x))."""

    def __init__(self, dim, heads, num_steps, grid, text_dim=None, num_classes=0, class_null="learned",
                 mlp="fc", mlp_ratio=4.0, activation="gelu2"):
        super().__init__()
        self.text = text_dim is not None
        self.ln1 = AdaLayerNorm(dim, num_steps)
        if self.text:
            self.attn1 = SelfAttention(dim, heads)
            self.ln1_1 = AdaLayerNorm(dim, num_steps)
            self.attn2 = SelfAttention(dim, heads, context_dim=text_dim)
        else:
            self.attn = SelfAttention(dim, heads)
        self.class_adaln = num_classes > 0
        self.ln2 = AdaLayerNorm(dim, num_classes, class_null) if self.class_adaln else nn.LayerNorm(dim)
        hidden = int(mlp_ratio * dim)
        act = GELU2() if activation == "gelu2" else nn.GELU()
        if mlp == "conv":
            self.mlp = ConvMLP(dim, hidden, grid, act)
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), act, nn.Linear(hidden, dim))

    def forward(self, x, steps, context=None, class_ids=None):
        x = x + (self.attn1 if self.text else self.attn)(self.ln1(x, steps))
        if self.text:
            x = x + self.attn2(self.ln1_1(x, steps), context)
        h = self.ln2(x, class_ids) if self.class_adaln else self.ln2(x)
        return x + self.mlp(h)


class ContentEmbedding(nn.Module):
    """ids [B, N] (K+1 classes) -> [B, N, D] plus height_emb[row] + width_emb[col] of a pos_grid table.

    Flat token i takes entry i of the raster-flattened pos_grid (rows x cols) table; with pos_grid equal to
    the token grid that is (i // w, i % w). The released 16x16 class/unconditional models use a 32x32 table
    (rows i // 32, only rows 0..7 reached) and need pos_grid [32, 32] to reproduce their outputs.
    """

    def __init__(self, num_embed: int, dim: int, pos_grid: tuple[int, int], num_tokens: int):
        super().__init__()
        self.emb = nn.Embedding(num_embed, dim)
        self.height_emb = nn.Embedding(pos_grid[0], dim)
        self.width_emb = nn.Embedding(pos_grid[1], dim)
        idx = torch.arange(num_tokens)
        self.register_buffer("rows", idx // pos_grid[1], persistent=False)
        self.register_buffer("cols", idx % pos_grid[1], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) + self.height_emb(self.rows) + self.width_emb(self.cols)


# ============================================================================ the prior


@register_prior("vqdiffusion")
class VQDiffusion(nn.Module):
    """Discrete (mask-and-replace) diffusion prior over a VQ tokenizer's h x w code grid.

    Args (model.* config keys):
        condition: "auto" (class when the data has classes, else none), "class", "text" or "none".
        dim, depth, heads, mlp ("fc" | "conv"), mlp_ratio, activation ("gelu2" | "gelu"): the transformer.
        pos_grid: [rows, cols] of the position tables (default: the token grid; see ContentEmbedding).
        num_steps: T. schedule: "mask" | "mask_and_replace" | {alpha_bar: [a1, aT], gamma_bar: [g1, gT]}.
        aux_weight, adaptive_aux: the auxiliary x_0 cross-entropy weight lambda and its (2 - (t-1)/T) factor.
        mask_weight: [masked, unmasked] per-token weights of both loss terms.
        importance_sampling, importance_warmup: draw t ~ sqrt(EMA L_t^2) once every t was seen warmup times.
        class_dropout: training labels -> null class with this probability (for classifier-free guidance).
        class_null: "learned" (a trained null row) or "mean" (the mean class row; models without one).
        text_encoder_weights: a local CLIP ViT-B/32 state dict (see models.conditioners); text_encoder_allow_random,
            text_encoder_seed: random weights instead (tests); text_quick_gelu, text_tower: its architecture.
        text_context: leading text positions attended (77 as released; fewer is exact and cheaper).
        text_dropout: training captions -> the null text with this probability; an empty caption always is.
        learnable_null: a learned [text_context, width] null text embedding (else the encoding of "").
        text_cache_size: captions whose CLIP features are kept in memory.
        remap: path of a codes_used.npy: model only the codes a data set uses.
    """

    accepts = ("vq",)
    conditions = ("none", "class", "text")
    sampling_defaults = dict(
        truncation_rate=1.0,  # keep the most likely x_0 codes up to this mass, every step (1 = off)
        num_steps=0,  # visit this many evenly spaced steps with exact jump posteriors (0 = all T)
        sampler="posterior",  # posterior | fixed_budget | purity (fixed number of tokens revealed per step)
        reveal_per_call=0,  # fixed_budget/purity: most tokens revealed per network call (0 = the step's quota)
        purity_weight=0.0,  # purity: sharpen x_0 draws to softmax((1 + r * purity) log p)
    )

    def __init__(
        self,
        *,
        token_shape,
        codebook_size: int,
        num_classes: int = 0,
        tokenizer=None,
        condition: str = "auto",
        dim: int = 512,
        depth: int = 8,
        heads: int = 8,
        mlp: str = "fc",
        mlp_ratio: float = 4.0,
        activation: str = "gelu2",
        pos_grid=None,
        num_steps: int = 100,
        schedule="mask",
        aux_weight: float = 5e-4,
        adaptive_aux: bool = True,
        mask_weight=(1.0, 1.0),
        importance_sampling: bool = True,
        importance_warmup: int = 10,
        class_dropout: float = 0.0,
        class_null: str = "learned",
        text_encoder_weights: str | None = None,
        text_encoder_allow_random: bool = False,
        text_encoder_seed: int = 0,
        text_quick_gelu: bool = True,
        text_tower: dict | None = None,
        text_context: int = 77,
        text_dropout: float = 0.0,
        learnable_null: bool = True,
        text_cache_size: int = 1024,
        remap: str | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        token_shape = tuple(int(s) for s in token_shape)
        if len(token_shape) != 2:
            raise TesseraError(f"vqdiffusion needs a 2-D code grid (h, w), got token_shape {token_shape}")
        if condition == "auto":
            condition = "class" if num_classes > 0 else "none"
        if condition not in ("class", "text", "none"):
            raise TesseraError(f"model.condition='{condition}' is not one of: auto, class, text, none")
        if condition == "class" and num_classes < 1:
            raise TesseraError("model.condition=class but the data has no classes; use condition: none or text")
        if mlp not in ("fc", "conv") or activation not in ("gelu2", "gelu"):
            raise TesseraError(f"model.mlp must be fc|conv and model.activation gelu2|gelu, got {mlp}, {activation}")
        for name, p in (("class_dropout", class_dropout), ("text_dropout", text_dropout)):
            if not 0.0 <= p < 1.0:
                raise TesseraError(f"model.{name}={p} must be in [0, 1)")
        self.token_shape = token_shape
        self.h, self.w = token_shape
        self.num_tokens = self.h * self.w
        self.condition = condition
        self.num_classes = int(num_classes) if condition == "class" else 0
        self.class_dropout, self.class_null = float(class_dropout), class_null
        self.text_dropout, self.learnable_null = float(text_dropout), bool(learnable_null)
        self.aux_weight, self.adaptive_aux = float(aux_weight), bool(adaptive_aux)
        self.mask_weight = tuple(float(m) for m in mask_weight)
        self.importance_sampling, self.importance_warmup = bool(importance_sampling), int(importance_warmup)
        self.grad_checkpointing = grad_checkpointing
        self.full_codebook_size = int(codebook_size)

        # codes modelled: all K of the tokenizer, or the K' a data set uses
        code_map = self._load_code_map(remap, tokenizer) if remap else None
        K = self.full_codebook_size if code_map is None else len(code_map[1])
        self.codebook_size = K
        if code_map is not None:
            self.register_buffer("full_to_code", code_map[0])
            self.register_buffer("code_to_full", code_map[1])

        self.diffusion = MaskReplaceDiffusion(K, num_steps, schedule)
        self.num_steps = int(num_steps)

        self.text = None
        text_dim = None
        if condition == "text":
            encoder = get_text_encoder(weights=text_encoder_weights, allow_random=bool(text_encoder_allow_random),
                                       seed=int(text_encoder_seed), quick_gelu=bool(text_quick_gelu),
                                       tower=dict(text_tower) if text_tower else None, context=int(text_context))
            self.text = TextEncoderHandle(encoder, cache_size=text_cache_size)
            text_dim = encoder.width
            if self.learnable_null:
                self.empty_text_embed = nn.Parameter(torch.randn(encoder.context, text_dim))

        pos_grid = tuple(int(p) for p in (pos_grid or token_shape))
        if pos_grid[0] * pos_grid[1] < self.num_tokens:
            raise TesseraError(f"model.pos_grid={list(pos_grid)} has fewer cells than the {self.num_tokens} tokens")
        self.content_emb = ContentEmbedding(K + 1, dim, pos_grid, self.num_tokens)
        self.blocks = nn.ModuleList(
            Block(dim, heads, self.num_steps, token_shape, text_dim=text_dim, num_classes=self.num_classes,
                  class_null=class_null, mlp=mlp, mlp_ratio=mlp_ratio, activation=activation)
            for _ in range(depth)
        )
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, K))
        self.register_buffer("Lt_history", torch.zeros(self.num_steps))
        self.register_buffer("Lt_count", torch.zeros(self.num_steps))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ClassEmbedding):
                nn.init.normal_(m.weight, std=0.02)

    # ------------------------------------------------------------------ codes

    def _load_code_map(self, path, tokenizer):
        """(full_to_code [K_full], code_to_full [K']) from codes_used.npy (sorted full ids the data uses).

        A full code the data never used maps to its nearest used code in the tokenizer's codebook (or to
        code 0 when no tokenizer is at hand; the weights then carry the saved map).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise TesseraError(f"model.remap={path} does not exist; write it with "
                               "python main_tokenizer.py --remap --run-dir TOKENIZER_RUN")
        used = torch.from_numpy(np.load(path).astype(np.int64))
        if used.ndim != 1 or used.numel() < 2 or int(used.min()) < 0 or int(used.max()) >= self.full_codebook_size:
            raise TesseraError(f"{path} is not a list of used code ids in [0, {self.full_codebook_size})")
        full_to_code = torch.zeros(self.full_codebook_size, dtype=torch.long)
        if tokenizer is not None and hasattr(tokenizer, "embed"):
            with torch.no_grad():
                codes = tokenizer.embed(torch.arange(self.full_codebook_size)).float()
            full_to_code = torch.cdist(codes, codes[used]).argmin(1)
        full_to_code[used] = torch.arange(len(used))
        return full_to_code, used

    def to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokenizer ids [B, h, w] -> modelled codes [B, N]."""
        ids = check_code_grid(tokens, tuple(self.token_shape), self.full_codebook_size, "vqdiffusion")
        return self.full_to_code[ids] if hasattr(self, "full_to_code") else ids

    def to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """modelled codes [B, N] (-1 kept) -> tokenizer ids [B, h, w]."""
        if hasattr(self, "code_to_full"):
            codes = torch.where(codes >= 0, self.code_to_full[codes.clamp_min(0)], codes)
        return codes.reshape(codes.shape[0], self.h, self.w)

    # ------------------------------------------------------------------ conditions

    def _class_ids(self, cond: dict, batch: int, device, sampling: bool) -> torch.Tensor | None:
        labels = (cond or {}).get("class")
        if self.condition != "class":
            if labels is not None:
                raise TesseraError(f"this vqdiffusion is conditioned on {self.condition}, but cond has 'class'")
            return None
        emb = self.blocks[0].ln2.emb
        if labels is None:
            if sampling:
                return torch.full((batch,), emb.null_id, dtype=torch.long, device=device)
            raise TesseraError(f"this vqdiffusion is class-conditional ({self.num_classes} classes) but cond has "
                               "no 'class'")
        labels = emb.check(labels, batch, device)
        if self.training and not sampling and self.class_dropout > 0:
            labels = torch.where(torch.rand(batch, device=device) < self.class_dropout,
                                 torch.full_like(labels, emb.null_id), labels)
        return labels

    def null_text(self, batch: int, device) -> torch.Tensor:
        """The unconditional text features [B, L, width]: the learned null, or the encoding of ""."""
        if self.learnable_null:
            return self.empty_text_embed.float()[None].expand(batch, -1, -1)
        return self.text.encode([""] * batch, device)

    def _text_features(self, cond: dict, batch: int, device, sampling: bool) -> torch.Tensor | None:
        captions = (cond or {}).get("text")
        if self.condition != "text":
            if captions is not None:
                raise TesseraError(f"this vqdiffusion is conditioned on {self.condition}, but cond has 'text'")
            return None
        if captions is None:
            if sampling:
                return self.null_text(batch, device)
            raise TesseraError("this vqdiffusion is text-conditional but cond has no 'text' captions")
        if isinstance(captions, str) or len(captions) != batch:
            raise TesseraError(f"cond['text'] must be a list of {batch} captions")
        feats = self.text.encode(list(captions), device)
        drop = torch.tensor([len(str(c).strip()) == 0 for c in captions], device=device)
        if self.training and not sampling and self.text_dropout > 0:
            drop |= torch.rand(batch, device=device) < self.text_dropout
        if self.learnable_null and bool(drop.any()):
            feats = torch.where(drop[:, None, None], self.null_text(batch, device).to(feats.dtype), feats)
        return feats

    # ------------------------------------------------------------------ network

    def x0_logits(self, x_t: torch.Tensor, t: torch.Tensor, context=None, class_ids=None) -> torch.Tensor:
        """Network: x_t [B, N] ids (K = mask), t [B] in 1..T -> logits of x_0 over the K codes [B, N, K]."""
        x = self.content_emb(x_t)
        steps = t - 1
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, steps, context, class_ids, use_reentrant=False)
            else:
                x = blk(x, steps, context, class_ids)
        return self.to_logits(x)

    # ------------------------------------------------------------------ training

    def _draw_t(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] in 1..T and p(t) [B] (float64)."""
        T = self.num_steps
        if self.importance_sampling and bool((self.Lt_count > self.importance_warmup).all()):
            w = torch.sqrt(self.Lt_history.double() + 1e-10) + 1e-4
            w[0] = w[1]  # the t = 1 (decoder) term takes the weight of t = 2, as released
            p = w / w.sum()
            idx = torch.multinomial(p, batch, replacement=True)
            return idx + 1, p[idx]
        idx = torch.randint(0, T, (batch,), device=device)
        return idx + 1, torch.full((batch,), 1.0 / T, dtype=torch.float64, device=device)

    @torch.no_grad()
    def _update_loss_history(self, t: torch.Tensor, lt: torch.Tensor) -> None:
        """EMA (0.9) of the mean L_t^2 per step over the global batch; counts of draws per step."""
        idx = t - 1
        sums = torch.zeros(self.num_steps, dtype=torch.float64, device=t.device).index_add_(0, idx, lt.pow(2))
        counts = torch.zeros(self.num_steps, dtype=torch.float64, device=t.device).index_add_(
            0, idx, torch.ones_like(lt))
        stats = dist.all_reduce_sum(torch.stack([sums, counts]))
        seen = stats[1] > 0
        mean = stats[0] / stats[1].clamp_min(1)
        hist = self.Lt_history.double()
        self.Lt_history.copy_(torch.where(seen, 0.9 * hist + 0.1 * mean, hist).to(self.Lt_history.dtype))
        self.Lt_count.add_(stats[1].to(self.Lt_count.dtype))

    def forward(self, tokens: torch.Tensor, cond: dict) -> dict:
        """tokens [B, h, w] tokenizer ids, cond {"class": [B]} | {"text": [str] * B} | {} ->
        {"loss", "vb", "aux", "acc"} (per token; acc = x_0 accuracy on masked tokens)."""
        x0 = self.to_codes(tokens)
        B, device = x0.shape[0], x0.device
        class_ids = self._class_ids(cond, B, device, sampling=False)
        context = self._text_features(cond, B, device, sampling=False)
        t, pt = self._draw_t(B, device)
        x_t = self.diffusion.sample_xt(x0, t)
        logits = self.x0_logits(x_t, t, context, class_ids)
        log_px = F.log_softmax(logits.float(), dim=-1)  # the loss in float32 (as released); sampling in float64
        kl, log_p_x0 = self.diffusion.kl_and_nll(log_px, x0, x_t, t, t - 1)
        masked = x_t == self.codebook_size
        weight = torch.where(masked, self.mask_weight[0], self.mask_weight[1]).float()
        kl, nll_x0 = kl * weight, -log_p_x0 * weight  # the decoder term at t = 1
        first = (t == 1)[:, None]
        lt = torch.where(first, nll_x0, kl).sum(1)  # [B]
        ce = -log_px.gather(-1, x0[..., None]).squeeze(-1).clamp_min(LOG_MIN) * weight
        aux = torch.where(first, nll_x0, ce).sum(1)
        if self.adaptive_aux:
            aux = aux * (2.0 - (t - 1).float() / self.num_steps)
        if self.training:
            self._update_loss_history(t, lt.detach().double())
        n = B * self.num_tokens
        vb = (lt / pt.float()).sum() / n
        aux_loss = (aux / pt.float()).sum() / n
        loss = vb + self.aux_weight * aux_loss
        if self.condition == "text" and self.learnable_null:  # used by every step, so DDP always sees its grad
            loss = loss + 0.0 * self.empty_text_embed.sum()
        with torch.no_grad():
            hit = (logits.argmax(-1) == x0) & masked
            acc = hit.sum() / masked.sum().clamp_min(1)
        return {"loss": loss, "vb": vb.detach(), "aux": aux_loss.detach(), "acc": acc.float()}

    # ------------------------------------------------------------------ sampling

    def _check_sampling(self, s: dict) -> dict:
        if not 0.0 < float(s["truncation_rate"]) <= 1.0:
            raise TesseraError(f"sampling truncation_rate={s['truncation_rate']} must be in (0, 1] (1 = off)")
        if int(s["num_steps"]) != s["num_steps"] or not 0 <= int(s["num_steps"]):
            raise TesseraError(f"sampling num_steps={s['num_steps']} must be an integer >= 0 (0 = all)")
        if s["sampler"] not in SAMPLERS:
            raise TesseraError(f"sampling sampler='{s['sampler']}' is not one of: {', '.join(SAMPLERS)}")
        if int(s["reveal_per_call"]) != s["reveal_per_call"] or int(s["reveal_per_call"]) < 0:
            raise TesseraError(f"sampling reveal_per_call={s['reveal_per_call']} must be an integer >= 0")
        if float(s["purity_weight"]) < 0:
            raise TesseraError(f"sampling purity_weight={s['purity_weight']} must be >= 0")
        if s["cfg"] != 1.0 and self.condition == "none":
            raise TesseraError(f"sampling cfg={s['cfg']} needs a conditional model; set sampling.cfg=1.0")
        return dict(s, truncation_rate=float(s["truncation_rate"]), num_steps=int(s["num_steps"]),
                    reveal_per_call=int(s["reveal_per_call"]), purity_weight=float(s["purity_weight"]))

    def _predictor(self, s: dict, context, class_ids, null_context, null_ids):
        """x_t [B, N], t (int) -> processed log p(x_0) [B, N, K+1]: CFG, temperature, top-k, truncation."""
        guided = s["cfg"] != 1.0
        cfg, truncation = s["cfg"], s["truncation_rate"]

        def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
            B = x_t.shape[0]
            steps = torch.full((B,), t, dtype=torch.long, device=x_t.device)
            if guided:
                ctx = None if context is None else torch.cat([context, null_context])
                ids = None if class_ids is None else torch.cat([class_ids, null_ids])
                logits = self.x0_logits(x_t.repeat(2, 1), steps.repeat(2), ctx, ids).double()
                if s["temperature"] != 1.0:
                    logits = logits / s["temperature"]
                cond_lp, uncond_lp = F.log_softmax(logits, -1).clamp_min(LOG_MIN).chunk(2)
                log_p = uncond_lp + cfg * (cond_lp - uncond_lp)
                log_p = (log_p - torch.logsumexp(log_p, -1, keepdim=True)).clamp(LOG_MIN, 0)
            else:
                logits = self.x0_logits(x_t, steps, context, class_ids).double()
                if s["temperature"] != 1.0:
                    logits = logits / s["temperature"]
                log_p = F.log_softmax(logits, -1).clamp_min(LOG_MIN)
            log_p = top_k_filter(log_p, s["top_k"])
            log_p = top_p_filter(log_p, min(truncation, s["top_p"]))
            return F.pad(log_p, (0, 1), value=-math.inf)

        return predict

    @torch.no_grad()
    def sample(self, cond: dict, generators: list[torch.Generator], trace: bool = False, **sampling):
        """Draw len(generators) code grids [B, h, w] (tokenizer ids); row b uses only generators[b].

        cond: {"class": [B]} | {"text": [str] * B} | {} (no condition samples the null class / null text).
        sampling: temperature, top_k, top_p, cfg (guidance against the null class / learned null text, in
        log-probability space) and the sampling_defaults above; nothing is kept between calls.
        trace=True also returns partial grids (-1 = still masked) after each visited step, blank first.
        """
        s = self._check_sampling(check_sampling_kwargs(sampling, self.sampling_defaults))
        B = len(generators)
        device = self.content_emb.emb.weight.device
        class_ids = self._class_ids(cond, B, device, sampling=True)
        context = self._text_features(cond, B, device, sampling=True)
        null_ids = null_context = None
        if s["cfg"] != 1.0:
            if class_ids is not None:
                null_ids = torch.full_like(class_ids, self.blocks[0].ln2.emb.null_id)
            if context is not None:
                null_context = self.null_text(B, device).to(context.dtype)
        was_training = self.training
        self.eval()
        try:
            predict = self._predictor(s, context, class_ids, null_context, null_ids)
            steps = visited_steps(self.num_steps, s["num_steps"])
            if s["sampler"] == "posterior":
                codes, states = reverse_posterior(self.diffusion, predict, self.num_tokens, generators, steps,
                                                  trace=trace, device=device)
            else:
                codes, states = reverse_fixed_budget(self.diffusion, predict, self.num_tokens, generators, steps,
                                                     reveal_per_call=s["reveal_per_call"],
                                                     purity=s["sampler"] == "purity",
                                                     purity_weight=s["purity_weight"], trace=trace, device=device)
        finally:
            self.train(was_training)
        tokens = self.to_tokens(codes)
        return (tokens, [self.to_tokens(st) for st in states]) if trace else tokens

    # ------------------------------------------------------------------ optimisation

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on Linear/conv weights; none on biases, norms, embeddings, position tables."""
        return weight_decay_groups(self, weight_decay, (nn.Linear, nn.Conv2d))
