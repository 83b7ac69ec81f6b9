"""Gaussian diffusion maths for a per-token diffusion head (DiffLoss): schedule, q(x_t | x_0), posterior,
learned-range variance, the MSE + VLB training loss, and ancestral sampling on a respaced schedule.

Notation (T training steps, index t in 0..T-1):
    beta_t                        the noise schedule; alpha_t = 1 - beta_t; abar_t = prod_{s<=t} alpha_s
    q(x_t | x_0)                  = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0)         = N(c1_t x_0 + c2_t x_t, btilde_t I),
                                    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
                                    c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
                                    btilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    learned range (v in [-1, 1])  log sigma_t^2 = f log beta_t + (1 - f) log btilde_t, f = (v + 1) / 2, with
                                    log btilde_0 replaced by log btilde_1 (btilde_0 = 0)
The model predicts [eps | v] (2C channels for C-channel tokens). All tables are float64; lookups return the
dtype of the input.
"""

import math

import torch

from engine.errors import TesseraError


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The improved-DDPM cosine schedule: abar(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T,
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta). -> float64 [num_steps]."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def spaced_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` of the timesteps 0..num_steps-1, evenly spread with a fractional stride (num_steps-1)/(count-1)
    and rounded, always keeping the first and the last (T=1000, count=100 -> 0, 10, 20, ..., 989, 999)."""
    if not 1 <= count <= num_steps:
        raise TesseraError(f"num_sampling_steps={count} must be in [1, {num_steps}]")
    if count == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bin_width: float = 2.0 / 255) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised into bins of ``bin_width`` under N(mean, e^(2 log_scale)),
    with the outermost bins open-ended (the improved-DDPM decoder term at t = 0). Elementwise (nats)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + bin_width / 2))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


class GaussianDiffusion:
    """Tables of one schedule (betas [S]) and the operations on it. ``timestep_map[i]`` is the training-schedule
    index that step i of this (possibly respaced) schedule stands for: the model is always called with it."""

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        b = betas.double()
        self.num_steps = len(b)
        self.timestep_map = torch.arange(self.num_steps) if timestep_map is None else timestep_map.long()
        self.betas = b
        self.alphas_cumprod = torch.cumprod(1 - b, 0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / ab - 1).sqrt()
        self.posterior_variance = b * (1 - ab_prev) / (1 - ab)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else \
            torch.log(b.clone())
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * (1 - b).sqrt() / (1 - ab)
        self.log_betas = torch.log(b)

    def to(self, device) -> "GaussianDiffusion":
        """Move the tables to ``device`` (in place), so lookups never copy them again."""
        for name, value in vars(self).items():
            if torch.is_tensor(value) and value.device != torch.device(device):
                setattr(self, name, value.to(device))
        return self

    @classmethod
    def cosine(cls, num_steps: int = 1000) -> "GaussianDiffusion":
        return cls(cosine_betas(num_steps))

    def respaced(self, count: int) -> "GaussianDiffusion":
        """The schedule restricted to ``count`` kept steps: betas recomputed from the kept abar,
        beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}} (abar before the first kept step = 1)."""
        kept = spaced_timesteps(self.num_steps, count)
        ab = self.alphas_cumprod[kept]
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return GaussianDiffusion(1 - ab / prev, self.timestep_map[kept])

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] for t [N], shaped [N, 1, ...] to broadcast against ``like`` [N, ...]."""
        v = table.to(t.device)[t].to(like.dtype)
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t,
                                                                         x0) * noise

    def q_posterior(self, x0, xt, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    # ------------------------------------------------------------------ the model's reverse step

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v in [-1, 1] -> log sigma^2 interpolated between log btilde_t (v = -1) and log beta_t (v = 1)."""
        frac = (v + 1) / 2
        return frac * self._at(self.log_betas, t, v) + (1 - frac) * self._at(self.posterior_log_variance_clipped,
                                                                             t, v)

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_denoised: float = 0.0):
        """(mean, log variance, x0 prediction) of p(x_{t-1} | x_t) from the model's eps and v.

        clip_denoised > 0 clamps the x0 prediction to [-clip_denoised, clip_denoised] before the mean is formed
        (0: no clipping, the published MAR sampler)."""
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod,
                                                                             t, xt) * eps
        if clip_denoised > 0:
            x0 = x0.clamp(-clip_denoised, clip_denoised)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return mean, self.learned_log_variance(v, t), x0

    # ------------------------------------------------------------------ training

    def training_losses(self, model_fn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
        """Per-row losses for x0 [N, C] at steps t [N] with noise [N, C]; model_fn(xt, timesteps) -> [N, 2C].

        mse: mean over channels of (eps_hat - eps)^2.
        vb:  in bits per channel, the KL between q(x_{t-1} | x_t, x_0) and p(x_{t-1} | x_t) (t > 0) or the
             discretized decoder NLL (t = 0), computed with eps_hat detached so it trains only the variance.
        loss = mse + vb.  Returns {"loss", "mse", "vb"}, each [N].
        """
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.timestep_map.to(t.device)[t])
        C = x0.shape[1]
        eps, v = out[:, :C], out[:, C:]
        mse = (eps - noise).pow(2).mean(dim=1)
        vb = self.vlb_terms(x0, xt, t, eps.detach(), v)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vlb_terms(self, x0, xt, t, eps, v) -> torch.Tensor:
        """The VLB term of each row [N] (bits per channel), as in ``training_losses``."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar, _ = self.p_mean_variance(eps, v, xt, t)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, model_fn, noise: torch.Tensor, temperature: float = 1.0, clip_denoised: float = 0.0
               ) -> torch.Tensor:
        """Ancestral sampling over every step of this schedule, last to first.

        noise [S, N, C]: noise[0] is x_T; noise[i] (i >= 1) is the noise added at the i-th step (the step at
        schedule index S - i); the last step adds none. model_fn(xt [N, C], timesteps [N]) -> (eps, v).
        x_{t-1} = mean + exp(log sigma^2 / 2) * temperature * noise: the temperature scales the per-step
        noise only, not x_T. clip_denoised: see p_mean_variance.
        """
        S = self.num_steps
        if noise.shape[0] != S:
            raise ValueError(f"noise has {noise.shape[0]} draws for a {S}-step schedule")
        x = noise[0]
        for i, step in enumerate(range(S - 1, -1, -1)):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            eps, v = model_fn(x, self.timestep_map.to(x.device)[t])
            mean, logvar, _ = self.p_mean_variance(eps, v, x, t, clip_denoised)
            x = mean if step == 0 else mean + torch.exp(0.5 * logvar) * temperature * noise[i + 1]
        return x
