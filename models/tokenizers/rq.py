"""RQ tokenizer (RQ-VAE): conv encoder -> 1x1 conv -> residual quantizer -> 1x1 conv -> conv decoder.

Tokens of one image: LongTensor[h, w, depth]. Each cell's latent z is approximated by a sum of ``depth``
codes chosen greedily: k_0 = nearest(z), k_1 = nearest(z - e(k_0)), ... so deeper codes refine the
partial sum. Convnet parameter names are the taming layout shared with the VQ tokenizer.

Codebook training (EMA only, as in the published RQ-VAE). Within one training forward every depth searches
the SAME snapshot of the codebook; the statistics of all depths (per-code counts and sums of the residuals
assigned to each code) are accumulated and the EMA update and dead-code restarts run once, after the last
depth. (The published code refreshes a shared codebook between depths inside one pass, so depth d+1 sees
a table already moved by depth d's residuals; train-mode and eval-mode codes then disagree.)
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError
from models.registry import register_tokenizer
from models.tokenizers.autoencoder import ConvTokenizer
from models.tokenizers.quantizers import VectorQuantizer, _sample_global_rows


@dataclass
class RQOutput:
    """z_q [B, C, h, w] (decoder input), ids LongTensor[B, h, w, depth], loss (0-d), logs (0-d tensors)."""

    z_q: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    logs: dict = field(default_factory=dict)


class ResidualQuantizer(nn.Module):
    """Residual vector quantizer over ``depth`` steps. forward: z [B, dim, h, w] -> RQOutput.

    Args:
        codebook_size: K codes per codebook.
        dim: code width (= the latent's channels).
        depth: D, codes per cell.
        shared_codebook: one codebook for all depths (published default) or one per depth.
        beta: loss = beta * commit, commit = mean over depths d of mean((z - sg[Z_d])^2), where Z_d is the
            partial sum of the first d + 1 codes (every partial reconstruction is pulled towards z).
        ema_decay, ema_eps: EMA of per-code counts and sums (VectorQuantizer.ema_update), once per step.
        init: "random" (VectorQuantizer's uniform table) or "latent": on the first training forward the
            codebook is drawn from the global batch depth by depth: the rows used at depth d are residuals
            left by the codes drawn for depths < d (a shared codebook takes K / D rows per depth).
        restart_after, restart_noise: a code unused by every depth of the global batch for ``restart_after``
            consecutive steps is replaced by a residual of this step (plus noise); 0 = never.
        seed: base seed of the initialisation / restart generators (codebook j uses seed + j).

    State-dict keys: ``codebooks.{j}.*`` (VectorQuantizer buffers: embedding.weight [K, dim], cluster_size,
    embed_sum, initialized, num_updates, steps_since_used, pretrain_steps_done), j < 1 if shared else D.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        depth: int = 4,
        shared_codebook: bool = True,
        beta: float = 0.25,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        init: str = "random",
        restart_after: int = 0,
        restart_noise: float = 0.01,
        seed: int = 0,
    ):
        super().__init__()
        if depth < 1:
            raise TesseraError(f"rq quantizer.depth must be >= 1, got {depth}")
        if init not in ("random", "latent"):
            raise TesseraError(f"rq quantizer.init must be 'random' or 'latent', got {init!r}")
        self.codebook_size, self.dim, self.depth = int(codebook_size), int(dim), int(depth)
        self.shared_codebook, self.beta, self.init = bool(shared_codebook), float(beta), init
        n_books = 1 if self.shared_codebook else self.depth
        self.codebooks = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, beta=beta, codebook_update="ema", ema_decay=ema_decay,
                            ema_eps=ema_eps, init="random" if init == "random" else "latent",
                            restart_after=restart_after, restart_noise=restart_noise, seed=seed + j)
            for j in range(n_books)
        )

    def book_of(self, d: int) -> int:
        """Index of the codebook that depth d searches."""
        return 0 if self.shared_codebook else d

    def tables(self) -> list[torch.Tensor]:
        """Snapshots of the codebooks, one [K, dim] copy each (later in-place updates do not touch them)."""
        return [book._codes() for book in self.codebooks]

    def code_tables(self) -> torch.Tensor:
        """The codebooks stacked [n_books, K, dim] (detached)."""
        return torch.stack([book.codebook.detach().float() for book in self.codebooks])

    # ---- search and lookup ---------------------------------------------------------------------

    def search(self, e: torch.Tensor, tables: list[torch.Tensor]) -> tuple[torch.Tensor, list, list]:
        """Greedy residual search, no state change. e [M, dim] ->
        (ids LongTensor[M, D], residuals: D tensors [M, dim] (the input of each depth), partial sums: D [M, dim]).
        """
        r = e.detach()
        partial = torch.zeros_like(r)
        ids, residuals, partials = [], [], []
        for d in range(self.depth):
            codes = tables[self.book_of(d)]
            k = VectorQuantizer._nearest(r, codes)
            q = F.embedding(k, codes)
            residuals.append(r)
            ids.append(k)
            r = r - q
            partial = partial + q
            partials.append(partial)
        return torch.stack(ids, dim=1), residuals, partials

    @torch.no_grad()
    def quantize(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Code ids for latents z_flat [M, dim] -> LongTensor[M, D]. No state changes."""
        if z_flat.ndim != 2 or z_flat.shape[1] != self.dim:
            raise TesseraError(f"rq quantize expects latents [M, {self.dim}], got {tuple(z_flat.shape)}")
        with torch.autocast(z_flat.device.type, enabled=False):
            return self.search(z_flat.float(), self.tables())[0]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[..., D] -> per-depth code vectors [..., D, dim]."""
        if ids.shape[-1] != self.depth:
            raise TesseraError(f"rq codes must end in a depth axis of {self.depth}, got shape {tuple(ids.shape)}")
        tables = [book.codebook.float() for book in self.codebooks]
        return torch.stack([F.embedding(ids[..., d], tables[self.book_of(d)]) for d in range(self.depth)], dim=-2)

    # ---- training-time codebook state ------------------------------------------------------------

    @torch.no_grad()
    def _initialize(self, e: torch.Tensor) -> None:
        """Latent init (see the class docstring): codes drawn depth by depth from the global batch."""
        K, D = self.codebook_size, self.depth
        if self.shared_codebook:
            sizes = [K // D + (1 if d < K % D else 0) for d in range(D)]
        else:
            sizes = [K] * D
        gens = [book._generator(e.device, salt=1) for book in self.codebooks]
        drawn = [[] for _ in self.codebooks]
        r = e
        for d in range(D):
            j = self.book_of(d)
            book = self.codebooks[j]
            if sizes[d]:
                new = _sample_global_rows(r, sizes[d], gens[j])  # identical on every process
                drawn[j].append(book._with_noise(new, gens[j]))  # jitter: a drawn latent's residual is not 0
            if d < D - 1 and drawn[j]:
                codes = torch.cat(drawn[j])
                r = r - codes[VectorQuantizer._nearest(r, codes)]
        for book, parts in zip(self.codebooks, drawn):
            codes = torch.cat(parts)
            book._write_codes(torch.arange(K, device=e.device), codes.to(book.codebook.dtype))
            book.initialized.fill_(1)

    @torch.no_grad()
    def _update(self, residuals: list[torch.Tensor], ids: torch.Tensor) -> int:
        """One EMA step and one restart pass per codebook, from the statistics of all its depths.

        The pool of a shared codebook is [M, D, dim] flattened cell-major, so the global (rank-ordered) pool
        is the same for any number of processes. Returns the number of codes restarted.
        """
        restarted = 0
        for j, book in enumerate(self.codebooks):
            depths = [d for d in range(self.depth) if self.book_of(d) == j]
            pool = torch.stack([residuals[d] for d in depths], dim=1).reshape(-1, self.dim)
            chosen = ids[:, depths].reshape(-1)
            counts = book._global_counts(chosen)
            book.ema_update(pool, chosen, counts=counts)
            restarted += book.restart_dead_codes(pool, chosen, counts=counts)
        return restarted

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> RQOutput:
        """z [B, dim, h, w] -> RQOutput(z_q [B, dim, h, w] = sum of the D codes, ids [B, h, w, D], loss, logs)."""
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise TesseraError(f"rq quantizer expects latents [B, {self.dim}, h, w], got {tuple(z.shape)}")
        b, c, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            e = z.float().permute(0, 2, 3, 1).reshape(-1, c)
            if self.training and not all(int(book.initialized) for book in self.codebooks):
                self._initialize(e.detach())
            ids, residuals, partials = self.search(e, self.tables())
            commit = torch.stack([F.mse_loss(e, p) for p in partials]).mean()  # partials carry no grad
            loss = self.beta * commit
            final = partials[-1]
            out = e + (final - e).detach() if self.training and e.requires_grad else final
            z_q = out.reshape(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
            restarts = self._update(residuals, ids) if self.training else 0
            with torch.no_grad():
                logs = dict(commit=commit.detach(), restarts=torch.tensor(float(restarts), device=z.device))
                usage, perplexity = [], []
                for d in range(self.depth):
                    counts = torch.bincount(ids[:, d], minlength=self.codebook_size).float()
                    p = counts / counts.sum()
                    perplexity.append(torch.exp(-torch.xlogy(p, p).sum()))
                    usage.append((counts > 0).float().mean())
                    logs[f"residual_d{d}"] = (e.detach() - partials[d]).pow(2).mean()
                logs["perplexity"] = torch.stack(perplexity).mean()
                logs["usage_fraction"] = torch.stack(usage).mean()
        return RQOutput(z_q, ids.reshape(b, h, w, self.depth), loss, logs)


@register_tokenizer("rq")
class RQTokenizer(ConvTokenizer):
    """x [B, 3, R, R] in [-1, 1] <-> codes [B, R/f, R/f, depth], f = 2^(len(ch_mult)-1).

    Args:
        autoencoder: Encoder/Decoder kwargs (ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
            resolution, z_channels, mid_attn).
        embed_dim: width of the quantized latent between quant_conv and post_quant_conv (= code width).
        quantizer: ResidualQuantizer kwargs (codebook_size, depth, shared_codebook, beta, ema_decay, ema_eps,
            init, restart_after, restart_noise, seed).
    """

    kind = "rq"

    def __init__(self, *, autoencoder: dict, embed_dim: int = 256, quantizer: dict):
        super().__init__(autoencoder, embed_dim)
        self.embed_dim = int(embed_dim)
        q = dict(quantizer)
        if "codebook_size" not in q:
            raise TesseraError("model.quantizer needs codebook_size for the rq tokenizer")
        q.setdefault("dim", embed_dim)
        if int(q["dim"]) != self.embed_dim:
            raise TesseraError(f"rq codes have the latent's width: set model.quantizer.dim={embed_dim} or drop it")
        try:
            self.quantizer = ResidualQuantizer(**q)
        except TypeError as e:
            raise TesseraError(f"bad key in model.quantizer for the rq tokenizer: {e}") from e
        self.depth = self.quantizer.depth
        self.token_shape = (self.latent_size, self.latent_size, self.depth)
        self.codebook_size = self.quantizer.codebook_size

    def forward(self, x):
        """Training forward: x [B,3,R,R] -> (x_hat [B,3,R,R], RQOutput with loss, ids and logs)."""
        q = self.quantizer(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(q.z_q)), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, R, R] in [-1, 1] -> codes LongTensor[B, h, w, depth]."""
        z = self.quant_conv(self.encoder(x))
        b, c, h, w = z.shape
        ids = self.quantizer.quantize(z.permute(0, 2, 3, 1).reshape(-1, c))
        return ids.reshape(b, h, w, self.depth)

    def embed(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [..., depth] -> (code vectors [..., depth, embed_dim], their cumulative sums over depth).

        cumsum[..., d, :] is the partial reconstruction from the first d + 1 codes; cumsum[..., -1, :] is
        the latent the decoder sees.
        """
        vectors = self.quantizer.lookup(codes)
        return vectors, vectors.cumsum(dim=-2)

    def code_tables(self) -> torch.Tensor:
        """[n_books, K, embed_dim]; depth d uses table ``quantizer.book_of(d)``."""
        return self.quantizer.code_tables()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes [B, h, w, D] -> images [B, 3, R, R] clamped to [-1, 1]; ``depth`` = n decodes the first n codes
        of every cell only (coarse-to-fine view)."""
        if codes.ndim != 4 or codes.shape[-1] != self.depth:
            raise TesseraError(f"rq decode expects codes [B, h, w, depth={self.depth}], got {tuple(codes.shape)}")
        n = self.depth if depth is None else int(depth)
        if not 1 <= n <= self.depth:
            raise TesseraError(f"decode depth={depth} must be in [1, {self.depth}]")
        z_q = self.embed(codes)[1][..., n - 1, :].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype))).clamp(-1, 1)
