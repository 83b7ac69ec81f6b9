"""Vector quantizer for the VQ tokenizer (and the shared-codebook machinery the RQ tokenizer reuses).

One module, many published variants chosen by constructor options:

- squared-Euclidean nearest-code search, or cosine search on l2-normalised latents and codes;
- low-dimensional factorised codes: bias-free ``in_proj`` before the search, ``out_proj`` after lookup;
- codebook trained by gradient (codebook loss) or by exponential moving averages of assigned latents;
- straight-through or rotation-trick gradients to the encoder;
- random / latent / k-means initialisation, a warm-up that bypasses quantization, dead-code restarts
  and a codebook-usage (batch entropy) penalty.

Everything that changes the codebook is computed over the global batch of all processes (sums are
all-reduced, latents are gathered in rank order, random choices come from a generator seeded from a
buffer), so N processes with B/N rows each follow one process with B rows.
"""

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError

# ---- distributed helpers (no-ops in a plain process) ------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no autograd); returns ``t``."""
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _all_reduce_sum_autograd(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes: the backward pass sums the incoming gradients too."""
    if _dist_on():
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # deprecated in favour of a private API; same semantics
            warnings.simplefilter("ignore", FutureWarning)
            return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _row_counts(n: int, device) -> list[int]:
    """Rows held by every process, in rank order."""
    if not _dist_on():
        return [n]
    mine = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[M_local, ...] -> [M_global, ...]: every process's rows concatenated in rank order.

    Unequal row counts are padded for the (equal-size) all_gather and trimmed afterwards.
    """
    if not _dist_on():
        return t
    sizes = _row_counts(t.shape[0], t.device)
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _draw(total: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """n row indices in [0, total): without replacement while total >= n, else tiled permutations."""
    rounds = -(-n // total)
    return torch.cat([torch.randperm(total, generator=generator, device=device) for _ in range(rounds)])[:n]


def _sample_global_rows(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows drawn (``_draw``) from the global batch: the rank-ordered rows of x [M, D] of all processes.

    Only the chosen rows travel: each process writes the ones it holds into a zero tensor and the
    tensors are summed, which is exact (x + 0 = x).
    """
    sizes = _row_counts(x.shape[0], x.device)
    picks = _draw(sum(sizes), n, generator, x.device)
    if not _dist_on():
        return x[picks]
    start = sum(sizes[: dist.get_rank()])
    mine = (picks >= start) & (picks < start + x.shape[0])
    out = x.new_zeros(n, x.shape[1])
    out[mine] = x[picks[mine] - start]
    return _all_reduce_sum(out)


# ---- quantizer ---------------------------------------------------------------------------------


@dataclass
class VQOutput:
    """z_q [B, C, h, w] (what the decoder sees), ids LongTensor[B, h, w], loss (0-d), logs (0-d tensors)."""

    z_q: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    logs: dict = field(default_factory=dict)


class _CodeTable(nn.Module):
    """Holds the codebook as ``weight`` [K, dim]: a Parameter (gradient updates) or a buffer (EMA)."""

    def __init__(self, weight: torch.Tensor, trainable: bool):
        super().__init__()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)


def _rotate_to(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick: forward value q, gradient to e rotated (e -> q direction) and rescaled by |q|/|e|.

    With unit vectors u = e/|e|, v = q/|q| and w = (u+v)/|u+v|, the map R = I - 2ww^T + 2vu^T sends
    u to v; R and the scale are treated as constants. e, q: [M, d].
    """
    e_norm = e.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_norm = q.detach().norm(dim=-1, keepdim=True)
    u = e.detach() / e_norm
    v = q.detach() / q_norm.clamp_min(1e-12)
    w = F.normalize(u + v, dim=-1)
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * v
    rotated = rotated * (q_norm / e_norm)
    return q.detach() + (rotated - rotated.detach())


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer. forward: z [B, C, h, w] -> VQOutput.

    Args:
        codebook_size: K, number of codes.
        dim: width of a code (the search space).
        input_dim: width C of the incoming latent; when it differs from ``dim`` the codes are
            factorised: bias-free ``in_proj`` (C -> dim) before the search and ``out_proj``
            (dim -> C) after lookup, both trained by gradient.
        beta: loss weight. Standard: loss = codebook + beta * commit. ``legacy_beta=True`` gives the
            convention of the published VQGAN checkpoints: loss = commit + beta * codebook.
            With ``codebook_update="ema"`` there is no codebook term: loss = beta * commit.
            commit = mean((e - sg[q])^2), codebook = mean((sg[e] - q)^2), e the (projected) latent.
        cosine: l2-normalise latents and codes for the search AND for the returned code vectors and
            the losses (the decoder sees unit-norm codes). This differs from quantizers that normalise
            only the search and return the raw codes.
        codebook_update: "grad" (codebook is a Parameter trained by the codebook loss) or "ema" (a
            buffer set to embed_sum / cluster_size, both exponential moving averages with decay
            ``ema_decay``; cluster sizes are Laplace-smoothed with ``ema_eps``). The EMA statistics
            start at cluster_size = 1 and embed_sum = the initial code, i.e. every code begins as
            if one latent equal to itself had been assigned to it.
        init: "random" (uniform in +-1/K, as the published VQGAN), "latent" (on the first quantizing
            training forward, and before that batch is quantized, K rows drawn from the global batch
            of projected latents; tiled with noise ``restart_noise * |v|`` when there are fewer than
            K) or "kmeans" (the same draw refined by ``kmeans_iters`` Lloyd iterations on all
            gathered latents).
        restart_after: if > 0, a code not chosen by any token of the global batch for this many
            consecutive training steps is replaced by a latent of the global batch plus Gaussian noise
            of norm about ``restart_noise * |latent|``. Gradient codebooks are overwritten in place (the
            row keeps its optimizer state and this step's gradient); EMA codebooks also reset the
            code's statistics to cluster_size = 1, embed_sum = the new code.
        usage_weight, usage_temperature: if usage_weight > 0, adds usage_weight * (log K - H(p_bar)),
            where p_bar is the soft assignment softmax(-|e - c|^2 / temperature) averaged over all
            tokens of the global batch. Minimising it maximises the batch entropy, pushing code usage
            towards uniform. Computed in log space, so it stays finite when probabilities underflow.
        pretrain_steps: warm-up. For the first ``pretrain_steps`` training forwards quantization is
            bypassed: z_q = out_proj(e) (= z without factorisation or cosine), ids = -1 ("not
            quantized"), a zero loss that still touches every trainable parameter (so DDP sees
            them used). Eval forwards during the warm-up bypass too but are not counted.
            latent/kmeans initialisation happens on the first training forward after the warm-up.
        gradient: "ste" (value q, identity gradient to e) or "rotation" (rotation trick, ``_rotate_to``).
        seed: base seed of the generator used for initialisation and restarts; the generator of a
            step is seeded from (seed, num_updates), identical on every process.

    State-dict keys (always): ``embedding.weight`` [K, dim] (Parameter for "grad", buffer for
    "ema"), ``initialized`` [] long (1 once the codebook holds real codes), ``pretrain_steps_done``
    [] long, ``num_updates`` [] long (training steps taken), ``steps_since_used`` [K] long.
    With "ema": ``cluster_size`` [K], ``embed_sum`` [K, dim]. With input_dim != dim:
    ``in_proj.weight`` [dim, C], ``out_proj.weight`` [C, dim].

    A residual quantizer sharing this codebook calls ``quantize`` / ``lookup`` per depth, then once per
    step ``ema_update`` (latents and ids of all depths) and ``restart_dead_codes``. Collectives run
    only in training-mode forwards and in those methods, so every process must make the same calls.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        input_dim: int | None = None,
        beta: float = 0.25,
        legacy_beta: bool = False,
        cosine: bool = False,
        codebook_update: str = "grad",
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        init: str = "random",
        kmeans_iters: int = 10,
        restart_after: int = 0,
        restart_noise: float = 0.01,
        usage_weight: float = 0.0,
        usage_temperature: float = 1.0,
        pretrain_steps: int = 0,
        gradient: str = "ste",
        seed: int = 0,
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise TesseraError(f"quantizer needs codebook_size >= 1 and dim >= 1, got {codebook_size}, {dim}")
        if codebook_update not in ("grad", "ema"):
            raise TesseraError(f"quantizer.codebook_update must be 'grad' or 'ema', got {codebook_update!r}")
        if init not in ("random", "latent", "kmeans"):
            raise TesseraError(f"quantizer.init must be 'random', 'latent' or 'kmeans', got {init!r}")
        if gradient not in ("ste", "rotation"):
            raise TesseraError(f"quantizer.gradient must be 'ste' or 'rotation', got {gradient!r}")
        if codebook_update == "ema" and legacy_beta:
            raise TesseraError("quantizer.legacy_beta is for codebook_update='grad' only: drop it for 'ema'")
        if not 0.0 < ema_decay < 1.0:
            raise TesseraError(f"quantizer.ema_decay must lie in (0, 1), got {ema_decay}")
        if usage_temperature <= 0:
            raise TesseraError(f"quantizer.usage_temperature must be > 0, got {usage_temperature}")
        if min(restart_after, pretrain_steps, kmeans_iters) < 0 or usage_weight < 0 or beta < 0:
            raise TesseraError("quantizer: restart_after, pretrain_steps, kmeans_iters, usage_weight, beta "
                               "must be >= 0")
        self.codebook_size, self.dim = int(codebook_size), int(dim)
        self.input_dim = int(input_dim) if input_dim is not None else self.dim
        self.beta, self.legacy_beta, self.cosine = float(beta), bool(legacy_beta), bool(cosine)
        self.codebook_update, self.ema_decay, self.ema_eps = codebook_update, float(ema_decay), float(ema_eps)
        self.init, self.kmeans_iters = init, int(kmeans_iters)
        self.restart_after, self.restart_noise = int(restart_after), float(restart_noise)
        self.usage_weight, self.usage_temperature = float(usage_weight), float(usage_temperature)
        self.pretrain_steps, self.gradient, self.seed = int(pretrain_steps), gradient, int(seed)

        K = self.codebook_size
        weight = torch.empty(K, self.dim).uniform_(-1.0 / K, 1.0 / K)
        self.embedding = _CodeTable(weight, trainable=codebook_update == "grad")
        self.register_buffer("initialized", torch.tensor(int(init == "random")))
        self.register_buffer("pretrain_steps_done", torch.tensor(0))
        self.register_buffer("num_updates", torch.tensor(0))
        self.register_buffer("steps_since_used", torch.zeros(K, dtype=torch.long))
        if codebook_update == "ema":
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_sum", weight.clone())
        factorised = self.input_dim != self.dim
        self.in_proj = nn.Linear(self.input_dim, self.dim, bias=False) if factorised else nn.Identity()
        self.out_proj = nn.Linear(self.dim, self.input_dim, bias=False) if factorised else nn.Identity()

    @property
    def codebook(self) -> torch.Tensor:
        """The stored codes [K, dim] (un-normalised; the search normalises them when cosine=True)."""
        return self.embedding.weight

    # ---- search and lookup ----------------------------------------------------------------------

    def _codes(self) -> torch.Tensor:
        """Codes as used by the search and lookup [K, dim]. A copy, so in-place codebook updates later
        in the step do not invalidate tensors saved for backward."""
        codes = self.embedding.weight.float()
        return F.normalize(codes, dim=-1) if self.cosine else codes.clone()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """[M, C] latents -> [M, dim] search-space latents (in_proj, then l2-normalised if cosine)."""
        e = self.in_proj(x)
        return F.normalize(e, dim=-1) if self.cosine else e

    @staticmethod
    def _nearest(e: torch.Tensor, codes: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
        """argmin_k |e - c_k|^2 for e [M, d], codes [K, d] -> [M]; rows in chunks to bound memory."""
        c2 = codes.pow(2).sum(1)
        rows = max(1, chunk // codes.shape[0])
        return torch.cat([(c2 - 2 * part @ codes.t()).argmin(1) for part in e.split(rows)])

    @torch.no_grad()
    def quantize(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids for latents z_flat [M, input_dim] -> LongTensor[M]. No state changes."""
        if z_flat.ndim != 2 or z_flat.shape[1] != self.input_dim:
            raise TesseraError(f"quantize expects latents [M, {self.input_dim}], got {tuple(z_flat.shape)}")
        with torch.autocast(z_flat.device.type, enabled=False):
            return self._nearest(self._project(z_flat.float()), self._codes())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[...] -> code vectors [..., input_dim] (normalised if cosine, then out_proj)."""
        return self.out_proj(F.embedding(ids, self._codes()))

    # ---- codebook state updates (training only; all statistics global) ---------------------------

    def _generator(self, device: torch.device, salt: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + int(self.num_updates) * 16 + salt) % (2**63))
        return g

    def _with_noise(self, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """v [n, dim] + Gaussian noise of norm ~restart_noise * |v| per row (unit-norm again if cosine)."""
        noise = torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype)
        v = v + noise * (self.restart_noise * v.norm(dim=-1, keepdim=True) / v.shape[1] ** 0.5)
        return F.normalize(v, dim=-1) if self.cosine else v

    def _write_codes(self, which: torch.Tensor, new: torch.Tensor) -> None:
        """Overwrite codes ``which`` (index [n] or mask [K]) by ``new`` [n, dim]; reset their EMA stats."""
        self.embedding.weight.data[which] = new
        if self.codebook_update == "ema":
            self.cluster_size[which] = 1.0
            self.embed_sum[which] = new

    @torch.no_grad()
    def initialize_codebook(self, e: torch.Tensor) -> None:
        """Fill the codebook from search-space latents e [M, dim] of this process (global batch used)."""
        K = self.codebook_size
        g = self._generator(e.device, salt=1)
        if self.init == "kmeans":
            pool = _all_gather_rows(e)  # identical on every process
            n_global = pool.shape[0]
            codes = pool[_draw(n_global, K, g, e.device)]
        else:
            n_global = sum(_row_counts(e.shape[0], e.device))
            codes = _sample_global_rows(e, K, g)
        if n_global < K:  # tiled: jitter the repeats so they do not tie
            codes[n_global:] = self._with_noise(codes[n_global:], g)
        if self.init == "kmeans":
            codes = self._kmeans(pool, codes)
        if _dist_on():  # k-means on different devices may round differently; rank 0 decides
            dist.broadcast(codes, 0)
        self._write_codes(torch.arange(K, device=e.device), codes.to(self.embedding.weight.dtype))
        self.initialized.fill_(1)

    def _kmeans(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Lloyd iterations on x [N, dim] from codes [K, dim]; empty clusters keep their code."""
        for _ in range(self.kmeans_iters):
            ids = self._nearest(x, codes)
            counts = torch.bincount(ids, minlength=self.codebook_size).to(x.dtype)
            sums = torch.zeros_like(codes).index_add_(0, ids, x)
            means = sums / counts.clamp_min(1)[:, None]
            if self.cosine:
                means = F.normalize(means, dim=-1)
            codes = torch.where(counts[:, None] > 0, means, codes)
        return codes

    def _global_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Code-assignment counts [K] (float) over the global batch."""
        return _all_reduce_sum(torch.bincount(ids.reshape(-1), minlength=self.codebook_size).float())

    @torch.no_grad()
    def ema_update(self, flat_latents: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor | None = None):
        """One EMA step from search-space latents [M, dim] and their ids [M] (global sums) -> counts [K].

        cluster_size <- decay * cluster_size + (1 - decay) * counts, likewise embed_sum with the
        per-code sums of latents; codebook <- embed_sum / smoothed cluster_size, where
        smoothed = (cluster_size + eps) / (n + K * eps) * n and n = sum(cluster_size).
        A residual quantizer passes the latents and ids of all depths at once.
        """
        if self.codebook_update != "ema":
            raise TesseraError("ema_update needs codebook_update='ema'")
        ids = ids.reshape(-1)
        counts = self._global_counts(ids) if counts is None else counts
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat_latents.to(self.embed_sum.dtype))
        _all_reduce_sum(sums)
        self.cluster_size.lerp_(counts, 1 - self.ema_decay)
        self.embed_sum.lerp_(sums, 1 - self.ema_decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        codes = self.embed_sum / smoothed[:, None]
        self.embedding.weight.copy_(F.normalize(codes, dim=-1) if self.cosine else codes)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, flat_latents: torch.Tensor, used_ids: torch.Tensor,
                           counts: torch.Tensor | None = None) -> int:
        """End-of-step bookkeeping; call once per training step -> number of codes restarted.

        flat_latents [M, dim]: search-space latents of this process (the pool for replacements);
        used_ids: ids chosen this step (any shape). Advances ``num_updates``.
        """
        restarted = 0
        if self.restart_after > 0:
            counts = self._global_counts(used_ids) if counts is None else counts
            self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.steps_since_used >= self.restart_after).nonzero().squeeze(1)
            restarted = int(dead.numel())
            if restarted:
                g = self._generator(flat_latents.device, salt=2)
                new = self._with_noise(_sample_global_rows(flat_latents.float(), restarted, g), g)
                self._write_codes(dead, new.to(self.embedding.weight.dtype))
                self.steps_since_used[dead] = 0
        self.num_updates.add_(1)
        return restarted

    # ---- forward -------------------------------------------------------------------------------

    def _usage_loss(self, e: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log K - H(mean_tokens softmax(-|e - c|^2 / T)) over the global batch (0-d, differentiable)."""
        logits = (2 * e @ codes.t() - codes.pow(2).sum(1)) / self.usage_temperature  # -|e-c|^2 + const(e)
        log_p = logits.log_softmax(dim=1)
        lse = log_p.logsumexp(dim=0)  # [K] log of summed probabilities on this process
        if not self.training:
            log_mean = lse - torch.log(torch.tensor(float(e.shape[0]), device=e.device))
        else:
            top = _all_reduce_max(lse.detach().clone())  # per code; one process attains it, so s >= 1
            s = _all_reduce_sum_autograd(torch.exp(lse - top))
            n = _all_reduce_sum(torch.tensor(float(e.shape[0]), device=e.device))
            log_mean = s.log() + top - n.log()
        entropy = -(log_mean.exp() * log_mean).sum()
        return torch.log(torch.tensor(float(self.codebook_size), device=e.device)) - entropy

    def _bypass(self, z: torch.Tensor, e: torch.Tensor) -> VQOutput:
        b, _, h, w = z.shape
        if self.training:
            self.pretrain_steps_done.add_(1)
        z_q = self.out_proj(e).reshape(b, h, w, -1).permute(0, 3, 1, 2).to(z.dtype)
        # zero, but touches every trainable parameter so DDP sees them all used
        loss = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), z.new_zeros(()))
        zero = z.new_zeros(()).detach()
        logs = {k: zero for k in ("commit", "codebook", "usage", "perplexity", "usage_fraction", "restarts")}
        return VQOutput(z_q, torch.full((b, h, w), -1, dtype=torch.long, device=z.device), loss, logs)

    def forward(self, z: torch.Tensor) -> VQOutput:
        """z [B, input_dim, h, w] -> VQOutput(z_q [B, input_dim, h, w], ids [B, h, w], loss, logs)."""
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise TesseraError(f"quantizer expects latents [B, {self.input_dim}, h, w], got {tuple(z.shape)}")
        b, c, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            e = self._project(z.float().permute(0, 2, 3, 1).reshape(-1, c))  # [M, dim]
            if self.pretrain_steps and int(self.pretrain_steps_done) < self.pretrain_steps:
                return self._bypass(z, e)
            if self.training and not int(self.initialized):
                self.initialize_codebook(e.detach())

            codes = self._codes()
            ids = self._nearest(e.detach(), codes.detach())
            q = F.embedding(ids, codes)
            commit = F.mse_loss(e, q.detach())
            if self.codebook_update == "ema":
                codebook_loss = commit.new_zeros(())
                loss = self.beta * commit
            else:
                codebook_loss = F.mse_loss(e.detach(), q)
                if self.legacy_beta:
                    loss = commit + self.beta * codebook_loss
                else:
                    loss = codebook_loss + self.beta * commit
            usage = commit.new_zeros(())
            if self.usage_weight > 0:
                usage = self._usage_loss(e, codes)
                loss = loss + self.usage_weight * usage

            if self.training and e.requires_grad:
                out = _rotate_to(e, q) if self.gradient == "rotation" else q + (e - e.detach())
            else:
                out = q
            z_q = self.out_proj(out).reshape(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)

            restarts = 0
            with torch.no_grad():
                if self.training:
                    counts = self._global_counts(ids)
                    if self.codebook_update == "ema":
                        self.ema_update(e.detach(), ids, counts=counts)
                    restarts = self.restart_dead_codes(e.detach(), ids, counts=counts)
                else:
                    counts = torch.bincount(ids, minlength=self.codebook_size).float()
                p = counts / counts.sum()
                perplexity = torch.exp(-torch.xlogy(p, p).sum())
                usage_fraction = (counts > 0).float().mean()
        logs = dict(commit=commit.detach(), codebook=codebook_loss.detach(), usage=usage.detach(),
                    perplexity=perplexity, usage_fraction=usage_fraction,
                    restarts=torch.tensor(float(restarts), device=z.device))
        return VQOutput(z_q, ids.reshape(b, h, w), loss, logs)
