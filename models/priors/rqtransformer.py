"""RQ-Transformer: a spatial transformer over the h x w cells of an RQ code grid and a depth transformer over
the D codes of each cell.

For codes X [B, T = h*w, D] with code vectors v[t, d] (the tokenizer's codebook, or a learned table) and
partial sums s[t, d] = v[t, 0] + ... + v[t, d]:

    spatial input   u_t = sum_d input_proj(v[t, d]) + pos_spatial[t]
    spatial seq     [c_1 .. c_L, u_0 .. u_{T-2}]  (causal; c = condition tokens + pos_cond)
    context         h_t = spatial output at slot L - 1 + t  (sees the condition and cells < t)
    depth seq of t  [h_t + pos_depth[0], depth_proj(s[t, 0]) + pos_depth[1], .., depth_proj(s[t, D-2]) + pos_depth[D-1]]
    logits          slot d of the depth seq (causal) -> classifier_d -> code X[t, d]

The published models feed the frozen RQ-VAE codebook through the two projections (``code_embedding:
tokenizer``); the codebook is then a non-persistent copy of the tokenizer's, and a persistent fingerprint
refuses weights trained on another tokenizer. ``code_embedding: learned`` gives the prior its own table.

Conditions: none (one learned start token), class (a class token; row num_classes is the null class used for
label dropout and the unconditional half of classifier-free guidance), or text (a prefix of ``text.length``
BPE tokens in the same causal stack, with the auxiliary next-text-token loss; dropped captions become the
empty caption). Blocks follow the published ones: pre-LayerNorm (eps 1e-5), exact-erf GELU, no final norm
inside the stacks; each classifier is LayerNorm + Linear.
"""

import json
import math
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.errors import TesseraError
from models.layers import MLP, Block, KVCache
from models.priors.common import check_code_grid, class_labels, weight_decay_groups
from models.registry import register_prior
from samplers.logits import check_sampling_kwargs
from samplers.rq import sample_rq

# ----------------------------------------------------------------------------- text tokens


class ClipTextTokens:
    """The CLIP BPE bundled with open_clip: [sot] + tokens + [eot], truncated to ``length``, padded with 0."""

    vocab_size = 49408

    def __init__(self, length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.length = length
        self.bpe = SimpleTokenizer()
        self.sot, self.eot = self.bpe.encoder["<start_of_text>"], self.bpe.encoder["<end_of_text>"]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.bpe.encode(text)][: self.length - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class BPETextTokens:
    """A character-level BPE read from ``vocab.json`` (token -> id) and ``merges.txt`` (one "a b" pair a line,
    in merge order), the format of the published CC3M text tokenizer.

    Text is cleaned (control characters dropped, whitespace unified, CJK characters isolated), accents are
    stripped and it is lower-cased; words are split on whitespace and every punctuation character stands
    alone; each word's last symbol carries ``suffix``; pairs merge by rank. Unknown symbols map to ``unk``;
    the ids are truncated to ``length`` and right-padded with ``pad``.
    """

    def __init__(self, vocab, merges, length: int, lowercase: bool = True, suffix: str = "</w>",
                 unk: str = "[UNK]", pad: str = "[PAD]"):
        vocab, merges = Path(vocab).expanduser(), Path(merges).expanduser()
        for path, what in ((vocab, "vocab"), (merges, "merges")):
            if not path.is_file():
                raise TesseraError(f"text tokenizer {what} file {path} not found: set model.text.{what}")
        self.encoder = json.loads(vocab.read_text(encoding="utf-8"))
        self.ranks = {}
        for line in merges.read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            a, b = line.split()
            self.ranks.setdefault((a, b), len(self.ranks))
        for token in (unk, pad):
            if token not in self.encoder:
                raise TesseraError(f"text vocab {vocab} has no {token!r} token")
        self.unk, self.pad = self.encoder[unk], self.encoder[pad]
        self.vocab_size = max(self.encoder.values()) + 1
        self.length, self.lowercase, self.suffix = length, lowercase, suffix
        self._cache: dict[str, list[int]] = {}

    def normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"):
                continue
            out.append(f" {ch} " if _is_cjk(cp) else " " if ch.isspace() else ch)
        text = "".join(out)
        if self.lowercase:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
            text = text.lower()
        return text

    def words(self, text: str) -> list[str]:
        """Whitespace-separated words of the normalised text, every punctuation character on its own."""
        return [piece for chunk in self.normalize(text).split() for piece in _split_punct(chunk)]

    def bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + self.suffix]
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            first, second = symbols[i], symbols[i + 1]
            merged, j = [], 0
            while j < len(symbols):  # merge every occurrence of this pair, left to right
                if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            symbols = merged
        ids = [self.encoder.get(s, self.unk) for s in symbols]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in self.words(text) for i in self.bpe(w)]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.length), self.pad, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)[: self.length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _split_punct(word: str) -> list[str]:
    pieces, cur = [], ""
    for ch in word:
        if _is_punctuation(ch):
            pieces += [cur, ch] if cur else [ch]
            cur = ""
        else:
            cur += ch
    return pieces + ([cur] if cur else [])


TEXT_DEFAULTS = dict(tokenizer="clip", vocab=None, merges=None, vocab_size=None, length=32, loss_weight=0.1,
                     lowercase=True)


def build_text_tokens(cfg: dict):
    if cfg["tokenizer"] == "clip":
        return ClipTextTokens(cfg["length"])
    return BPETextTokens(cfg["vocab"], cfg["merges"], cfg["length"], lowercase=cfg["lowercase"])


# ----------------------------------------------------------------------------- layers


class _ErfMLP(MLP):
    """The transformer MLP with the exact (erf) GELU of the published blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Classifier(nn.Module):
    """LayerNorm + Linear: [..., dim] -> logits [..., vocab]."""

    def __init__(self, dim: int, vocab: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def codebook_fingerprint(tables: torch.Tensor) -> torch.Tensor:
    """[n_books, K, C] -> float64 [n_books, 2]: sum and sum of squares of each codebook."""
    t = tables.detach().double()
    return torch.stack([t.sum((1, 2)), t.pow(2).sum((1, 2))], dim=1)


# ----------------------------------------------------------------------------- model


@register_prior("rqtransformer")
class RQTransformer(nn.Module):
    """Spatial + depth transformer over rq codes [B, h, w, D] (see the module docstring).

    Args (beyond the prior contract): dim, heads, spatial_layers, depth_layers (depth 0 layers: the spatial
    context goes straight to the classifier, i.e. a plain GPT for D = 1), mlp_ratio, dropout (residual),
    attn_dropout, embed_dropout; code_embedding "tokenizer" | "learned" (code_dim: width of a learned table);
    shared_classifier (one LayerNorm + Linear head for every depth, as released, or one per depth);
    cond_dropout (label / caption dropout for guidance); text: {tokenizer: clip | bpe, vocab, merges,
    vocab_size, length, loss_weight, lowercase} for a text prefix; norm_eps, gelu "exact" | "tanh".
    """

    accepts = ("rq",)
    conditions = ("none", "class", "text")
    sampling_defaults = dict(
        depth_temperature=None,  # list of D temperatures, one per depth (overrides temperature)
        depth_top_k=None,  # list of D top-k values (overrides top_k)
        depth_top_p=None,  # list of D top-p values (overrides top_p)
    )

    def __init__(
        self,
        *,
        token_shape,
        codebook_size: int,
        num_classes: int = 0,
        tokenizer=None,
        dim: int = 512,
        heads: int = 8,
        spatial_layers: int = 8,
        depth_layers: int = 2,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        code_embedding: str = "tokenizer",
        code_dim: int | None = None,
        shared_classifier: bool = True,
        cond_dropout: float = 0.1,
        text: dict | None = None,
        norm_eps: float = 1e-5,
        gelu: str = "exact",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        token_shape = tuple(int(s) for s in token_shape)
        if len(token_shape) != 3:
            raise TesseraError(f"rqtransformer needs rq tokens (h, w, depth), got token_shape {token_shape}")
        if code_embedding not in ("tokenizer", "learned"):
            raise TesseraError(f"model.code_embedding='{code_embedding}' is not one of: tokenizer, learned")
        if gelu not in ("exact", "tanh"):
            raise TesseraError(f"model.gelu='{gelu}' is not one of: exact, tanh")
        if dim % heads:
            raise TesseraError(f"model.dim={dim} is not divisible by model.heads={heads}")
        if not 0.0 <= cond_dropout < 1.0:
            raise TesseraError(f"model.cond_dropout={cond_dropout} must be in [0, 1)")
        self.token_shape = token_shape
        self.h, self.w, self.depth = token_shape
        self.num_positions = self.h * self.w
        self.codebook_size = int(codebook_size)
        self.dim, self.cond_dropout, self.grad_checkpointing = dim, cond_dropout, grad_checkpointing

        # conditions
        self.text_cfg = None
        if text is not None:
            unknown = set(text) - set(TEXT_DEFAULTS)
            if unknown:
                raise TesseraError(f"unknown config key 'model.text.{sorted(unknown)[0]}'; "
                                   f"known: {list(TEXT_DEFAULTS)}")
            self.text_cfg = {**TEXT_DEFAULTS, **text}
            kind = self.text_cfg["tokenizer"]
            if kind not in ("clip", "bpe"):
                raise TesseraError(f"model.text.tokenizer='{kind}' is not one of: clip, bpe")
            if kind == "clip":
                self.text_cfg["vocab_size"] = self.text_cfg["vocab_size"] or ClipTextTokens.vocab_size
            elif not (self.text_cfg["vocab"] and self.text_cfg["merges"] and self.text_cfg["vocab_size"]):
                raise TesseraError("model.text.tokenizer=bpe needs model.text.vocab, .merges and .vocab_size")
            self.num_classes = 0  # a text prior ignores class labels
            self.cond_len = int(self.text_cfg["length"])
            self.cond_emb = nn.Embedding(int(self.text_cfg["vocab_size"]), dim)
        else:
            self.num_classes = int(num_classes)
            self.cond_len = 1
            self.cond_emb = nn.Embedding(self.num_classes + 1, dim)  # row num_classes: null class / start token
        self._text_tokens = None

        # code vectors
        if code_embedding == "tokenizer":
            if tokenizer is None or not hasattr(tokenizer, "code_tables"):
                raise TesseraError("model.code_embedding=tokenizer needs the rq tokenizer; build the prior with "
                                   "models.build_prior(cfg, tokenizer) or set model.code_embedding=learned")
            tables = tokenizer.code_tables().detach().float().clone()
            self.book_of = [tokenizer.quantizer.book_of(d) for d in range(self.depth)]
            self.register_buffer("code_table", tables, persistent=False)
            self.register_buffer("codebook_fingerprint", codebook_fingerprint(tables))
            self.register_load_state_dict_pre_hook(_check_fingerprint)
        else:
            n_books = len(tokenizer.code_tables()) if tokenizer is not None else 1
            self.book_of = [d if n_books > 1 else 0 for d in range(self.depth)]  # as the tokenizer's codebooks
            width = int(code_dim or (tokenizer.embed_dim if tokenizer is not None else dim))
            self.code_table = nn.Parameter(torch.randn(n_books, self.codebook_size, width) * 0.02)
        if self.code_table.shape[1] != self.codebook_size:
            raise TesseraError(f"code table has {self.code_table.shape[1]} codes, the tokens {self.codebook_size}")
        code_width = self.code_table.shape[-1]

        self.pos_cond = nn.Parameter(torch.zeros(1, self.cond_len, dim))
        self.pos_spatial = nn.Parameter(torch.zeros(1, self.num_positions, dim))
        self.pos_depth = nn.Parameter(torch.zeros(1, self.depth, dim))
        self.input_proj = nn.Linear(code_width, dim)
        self.depth_proj = nn.Linear(code_width, dim)
        self.embed_drop = nn.Dropout(embed_dropout)

        def block():
            blk = Block(dim, heads, mlp_ratio, dropout=dropout, attn_dropout=attn_dropout)
            blk.norm1.eps = blk.norm2.eps = norm_eps
            if gelu == "exact":
                blk.mlp = _ErfMLP(dim, int(dim * mlp_ratio), dropout=dropout)
            return blk

        self.spatial_blocks = nn.ModuleList(block() for _ in range(spatial_layers))
        self.depth_blocks = nn.ModuleList(block() for _ in range(depth_layers))
        self.classifiers = nn.ModuleList(
            Classifier(dim, self.codebook_size, norm_eps) for _ in range(1 if shared_classifier else self.depth)
        )
        self.text_classifier = Classifier(dim, self.cond_emb.num_embeddings, norm_eps) if self.text_cfg else None
        self.spatial_len = self.cond_len + self.num_positions - 1
        self._init_weights(spatial_layers + depth_layers)

    def _init_weights(self, n_layers: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in [*self.spatial_blocks, *self.depth_blocks]:  # residual projections scaled with depth (GPT-2)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * max(n_layers, 1)))
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02 / math.sqrt(2 * max(n_layers, 1)))
        for p in (self.pos_cond, self.pos_spatial, self.pos_depth):
            nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ inputs

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w, D] -> codes [B, T, D], checked."""
        codes = check_code_grid(tokens, self.token_shape, self.codebook_size, "rqtransformer")
        return codes.view(codes.shape[0], self.num_positions, self.depth)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., D] -> code vectors [..., D, code_width] (depth d looks up table book_of[d])."""
        table = self.code_table.to(self.input_proj.weight.dtype)
        return torch.stack([F.embedding(codes[..., d], table[self.book_of[d]]) for d in range(codes.shape[-1])], -2)

    def text_tokens(self, texts) -> torch.Tensor:
        """Captions -> LongTensor[B, text.length] (on the model's device)."""
        if self._text_tokens is None:
            self._text_tokens = build_text_tokens(self.text_cfg)
            if self._text_tokens.vocab_size > self.cond_emb.num_embeddings:
                raise TesseraError(f"the text tokenizer has {self._text_tokens.vocab_size} tokens but "
                                   f"model.text.vocab_size={self.cond_emb.num_embeddings}; make them agree")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TesseraError("cond['text'] must be a list of caption strings")
        return self._text_tokens(list(texts)).to(self.pos_cond.device)

    def condition_ids(self, cond: dict, batch: int, allow_missing: bool = False, drop: bool | None = None):
        """Condition-table rows: [B] (none/class) or text token ids [B, L].

        drop: replace each condition by the null one (null class / empty caption) with probability cond_dropout;
        default: in training mode. A conditional model given no condition uses the null one only with
        ``allow_missing`` (sampling).
        """
        device = self.pos_cond.device
        drop = self.training if drop is None else drop
        if self.text_cfg is not None:
            texts = cond.get("text") if cond else None
            if texts is None:
                if not allow_missing:
                    raise TesseraError("this rqtransformer is text-conditional but cond has no 'text'")
                texts = [""] * batch
            if len(texts) != batch:
                raise TesseraError(f"cond['text'] has {len(texts)} captions for a batch of {batch}")
            texts = list(texts)
            if drop and self.cond_dropout > 0:
                dropped = torch.rand(batch) < self.cond_dropout
                texts = ["" if dropped[i] else t for i, t in enumerate(texts)]
            return self.text_tokens(texts)
        return class_labels(cond, batch, self.num_classes, device, "rqtransformer",
                            drop_prob=self.cond_dropout if drop else 0.0, allow_missing=allow_missing)

    def null_ids(self, batch: int) -> torch.Tensor:
        """The unconditional rows for guidance: null class, or the empty caption."""
        if self.text_cfg is not None:
            return self.text_tokens([""] * batch)
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.pos_cond.device)

    def prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """Condition rows [B] or text ids [B, L] -> the spatial sequence's first L slots [B, L, dim]."""
        emb = self.cond_emb(ids if ids.dim() == 2 else ids[:, None])
        return emb + self.pos_cond

    def spatial_inputs(self, vectors: torch.Tensor, start: int) -> torch.Tensor:
        """Code vectors [B, t, D, C] of cells start .. start+t-1 -> spatial inputs [B, t, dim]."""
        t = vectors.shape[1]
        return self.input_proj(vectors).sum(2) + self.pos_spatial[:, start : start + t]

    def depth_inputs(self, context: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """context [N, dim], code vectors [N, d, C] of the first d < D depths -> depth inputs [N, d + 1, dim]."""
        parts = [context[:, None]]
        if vectors.shape[1]:
            parts.append(self.depth_proj(vectors.cumsum(1)))
        x = torch.cat(parts, 1)
        return x + self.pos_depth[:, : x.shape[1]]

    # ------------------------------------------------------------------ transformers

    def run_spatial(self, x: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Spatial slots [B, t, dim] (after the cached ones) -> outputs [B, t, dim]."""
        x = self.embed_drop(x)
        for i, blk in enumerate(self.spatial_blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, True, use_reentrant=False)
            else:
                x = blk(x, causal=True, cache=caches[i] if caches is not None else None)
        return x

    def run_depth(self, x: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        for i, blk in enumerate(self.depth_blocks):
            x = blk(x, causal=True, cache=caches[i] if caches is not None else None)
        return x

    def classify(self, h: torch.Tensor, d: int) -> torch.Tensor:
        return self.classifiers[min(d, len(self.classifiers) - 1)](h)

    def logits(self, codes: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced: codes [B, T, D], condition ids -> (logits [B, T, D, K], spatial outputs [B, L+T-1, dim])."""
        B = codes.shape[0]
        vectors = self.code_vectors(codes)  # [B, T, D, C]
        x = torch.cat([self.prefix(ids), self.spatial_inputs(vectors[:, :-1], 0)], 1)
        hidden = self.run_spatial(x)
        context = hidden[:, self.cond_len - 1 :]  # [B, T, dim]
        depth_x = self.depth_inputs(context.reshape(-1, self.dim), vectors[:, :, :-1].reshape(
            B * self.num_positions, self.depth - 1, -1))
        out = self.run_depth(depth_x).view(B, self.num_positions, self.depth, self.dim)
        logits = torch.stack([self.classify(out[:, :, d], d) for d in range(self.depth)], 2)
        return logits, hidden

    def forward(self, tokens: torch.Tensor, cond: dict) -> dict:
        """tokens [B, h, w, D], cond {"class": [B]} | {"text": [str]} | {} -> {"loss", "nll", "acc", "nll_d*", ...}."""
        codes = self.check_tokens(tokens)
        ids = self.condition_ids(cond, codes.shape[0])
        logits, hidden = self.logits(codes, ids)
        nll = F.cross_entropy(logits.float().reshape(-1, self.codebook_size), codes.reshape(-1), reduction="none")
        nll = nll.view(codes.shape)
        out = {"nll": nll.mean().detach(), "acc": (logits.argmax(-1) == codes).float().mean().detach()}
        for d in range(self.depth):
            out[f"nll_d{d}"] = nll[..., d].mean().detach()
        loss = nll.mean()
        if self.text_cfg is not None and self.cond_len > 1:
            text_logits = self.text_classifier(hidden[:, : self.cond_len - 1]).float()
            text_nll = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), ids[:, 1:].reshape(-1))
            w = float(self.text_cfg["loss_weight"])
            loss = (1 - w) * loss + w * text_nll
            out["text_nll"] = text_nll.detach()
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ sampling (samplers.rq)

    def new_kv_caches(self) -> tuple[list[KVCache], list[KVCache]]:
        """(spatial caches, depth caches), one per layer."""
        return ([KVCache(self.spatial_len) for _ in self.spatial_blocks],
                [KVCache(self.depth) for _ in self.depth_blocks])

    def next_context(self, prefix: torch.Tensor, codes: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        """Context [R, dim] of cell t = codes.shape[1], given prefix [R, L, dim] and codes [R, t, D] of cells < t."""
        t = codes.shape[1]
        if caches is None or caches[0].length == 0:
            x = prefix if t == 0 else torch.cat([prefix, self.spatial_inputs(self.code_vectors(codes), 0)], 1)
        else:
            start = caches[0].length - self.cond_len  # cells already in the cache
            x = self.spatial_inputs(self.code_vectors(codes[:, start:]), start)
        return self.run_spatial(x, caches)[:, -1]

    def next_depth_logits(self, context: torch.Tensor, codes: torch.Tensor, caches: list[KVCache] | None):
        """Logits [R, K] of depth d = codes.shape[1] of one cell, given its context [R, dim] and codes [R, d]."""
        d = codes.shape[1]
        vectors = self.code_vectors(codes[:, None])[:, 0] if d else context.new_zeros(context.shape[0], 0, 1)
        x = self.depth_inputs(context, vectors)
        if caches:  # (no depth layers: nothing to cache)
            x = x[:, caches[0].length :]
        return self.classify(self.run_depth(x, caches)[:, -1], d)

    def _per_depth(self, s: dict, key: str, depth_key: str, cast) -> list:
        values = s[depth_key]
        if values is None:
            return [s[key]] * self.depth
        values = list(values)
        if len(values) != self.depth:
            raise TesseraError(f"sampling.{depth_key} needs {self.depth} values (one per depth), got {values}")
        checked = [check_sampling_kwargs({key: cast(v)})[key] for v in values]
        return checked

    @torch.no_grad()
    def sample(self, cond: dict, generators: list[torch.Generator], trace: bool = False, **sampling):
        """Draw len(generators) code grids [B, h, w, D]; row b uses only generators[b].

        cond: {"class": [B]} | {"text": [str]} | {} (the null condition on a conditional model).
        sampling: temperature, top_k, top_p (or per depth: depth_temperature, depth_top_k, depth_top_p),
        cfg, cfg_schedule, use_kv_cache. trace=True also returns [B, h, w, D] states (-1 = not generated
        yet): blank first, then one per generated row of cells.
        """
        s = check_sampling_kwargs(sampling, self.sampling_defaults)
        conditional = self.text_cfg is not None or self.num_classes > 0
        if s["cfg"] != 1.0 and not conditional:
            raise TesseraError(f"sampling cfg={s['cfg']} needs a conditional model; set sampling.cfg=1.0")
        B = len(generators)
        was_training = self.training
        self.eval()
        try:
            prefix = self.prefix(self.condition_ids(cond, B, allow_missing=True, drop=False))
            null_prefix = self.prefix(self.null_ids(B)) if s["cfg"] != 1.0 else None
            codes, states = sample_rq(
                self, prefix, null_prefix, generators,
                temperature=self._per_depth(s, "temperature", "depth_temperature", float),
                top_k=self._per_depth(s, "top_k", "depth_top_k", int),
                top_p=self._per_depth(s, "top_p", "depth_top_p", float),
                cfg=s["cfg"], cfg_schedule=s["cfg_schedule"], use_kv_cache=s["use_kv_cache"],
                trace_every=self.w if trace else 0,
            )
        finally:
            self.train(was_training)
        shape = (B, *self.token_shape)
        tokens = codes.view(shape)
        return (tokens, [st.view(shape) for st in states]) if trace else tokens

    # ------------------------------------------------------------------ optimisation

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return weight_decay_groups(self, weight_decay)

def _check_fingerprint(module, state_dict, prefix, *args):
    """Refuse prior weights whose recorded codebook is not the tokenizer's this prior was built with."""
    key = prefix + "codebook_fingerprint"
    if key in state_dict and module.codebook_fingerprint.device.type != "meta":
        theirs = state_dict[key].to(module.codebook_fingerprint)
        if not torch.allclose(theirs, module.codebook_fingerprint, rtol=1e-4, atol=1e-3):
            raise TesseraError("these rqtransformer weights were trained on a different tokenizer codebook than "
                               "the tokenizer given; use the tokenizer run the prior was trained (or converted) with")
