"""Condition encoders shared by the priors: a class-embedding table and the frozen CLIP text encoder.

``ClassEmbedding``: labels [B] -> vectors [B, dim], with a null row for dropped labels / guidance.

``CLIPTextEncoder``: captions -> per-token features [B, L, 512] of the CLIP ViT-B/32 text tower (open_clip's
architecture, its BPE tokenizer shipped with the package): every hidden state after ``ln_final`` (no
projection, no pooling), each token vector l2-normalised. Weights come from a local file only; nothing is
ever downloaded. The tower is causal, so the first L outputs of a 77-token pass depend only on the first L
tokens: ``context=L < 77`` returns exactly those L rows of the full pass, at L/77 of the cost.

The encoder is frozen and large (63M parameters), so priors do not own it as a submodule: they hold a
``TextEncoderHandle`` that stays out of ``state_dict``, is shared (not copied) by ``copy.deepcopy`` (the EMA
copy of a prior), follows the device of its inputs, and caches the features of recent captions.
"""

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import TesseraError

# ------------------------------------------------------------------------------------------ classes


class ClassEmbedding(nn.Module):
    """labels LongTensor[B] -> [B, dim]. Row ``num_classes`` is the null class.

    null: "learned" (a table of num_classes + 1 rows, the last one trained on dropped labels) or "mean"
    (num_classes rows; the null vector is the mean of all class rows, for models trained without a null).
    The table is ``weight`` [rows, dim], so a module holding it as ``emb`` has the key ``emb.weight``.
    """

    def __init__(self, num_classes: int, dim: int, null: str = "learned"):
        super().__init__()
        if null not in ("learned", "mean"):
            raise TesseraError(f"class null='{null}' is not one of: learned, mean")
        if num_classes < 1:
            raise TesseraError(f"a class embedding needs num_classes >= 1, got {num_classes}")
        self.num_classes, self.null = int(num_classes), null
        self.weight = nn.Parameter(torch.randn(num_classes + (null == "learned"), dim) * 0.02)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def check(self, labels, batch: int, device) -> torch.Tensor:
        """Validate labels (class ids, or null_id) -> LongTensor[batch] on device."""
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.shape[0] != batch:
            raise TesseraError(f"cond['class'] has {labels.shape[0]} labels for a batch of {batch}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise TesseraError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()[:8]}")
        return labels

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.null == "learned":
            return F.embedding(labels, self.weight)
        table = torch.cat([self.weight, self.weight.mean(0, keepdim=True)])
        return F.embedding(labels, table)


# ------------------------------------------------------------------------------------------ CLIP text

CLIP_TEXT_B32 = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, output_dim=512)
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.", "text_projection")


def _read_state(path: Path) -> dict:
    """A tensor dict from .safetensors, a weights-only torch file, or (read inertly) a legacy pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # foreign training checkpoints pickle other objects; read them without executing
        from engine.legacy import legacy_load

        obj = legacy_load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "ema"):  # whole checkpoints nest the weights
            if key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
                nested = obj[key]
                if any(k.endswith("token_embedding.weight") for k in nested):
                    return nested
        return obj
    raise TesseraError(f"{path} holds a {type(obj).__name__}, not a state dict; save the weights with "
                       "torch.save(model.state_dict()) or as .safetensors")


def text_tower_state(state: dict, source: str) -> dict:
    """The CLIP text-tower tensors of a state dict whose keys may carry a prefix (a whole CLIP model, a
    VQ-Diffusion checkpoint's ``transformer.condition_emb.``, ...), prefix removed, as float32."""
    anchors = [k for k in state if k.endswith("token_embedding.weight")]
    if not anchors:
        raise TesseraError(f"{source} has no CLIP text tower (no '*token_embedding.weight' key); give the "
                           "weights of an open_clip / OpenAI ViT-B-32 model")
    prefix = min(anchors, key=len)[: -len("token_embedding.weight")]
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and torch.is_tensor(value):
            rest = key[len(prefix):]
            if rest.startswith(TEXT_KEYS):
                out[rest] = value.float()
    return out


class CLIPTextEncoder(nn.Module):
    """Frozen CLIP text tower. captions list[str] -> features [B, context, width] (l2-normalised tokens).

    weights: a local state-dict file (.safetensors / .pt / .bin; a whole CLIP model or just its text tower).
    allow_random: with no file, build random weights from ``seed`` instead of failing (tests).
    quick_gelu: the OpenAI ViT-B/32 weights use x * sigmoid(1.702 x); open_clip's LAION ones use GELU.
    tower: architecture overrides of the ViT-B/32 text config (context_length, vocab_size, width, heads, layers).
    context: number of leading token positions returned (<= 77); exact, since the tower is causal.
    """

    def __init__(self, weights: str | None = None, allow_random: bool = False, seed: int = 0,
                 quick_gelu: bool = True, tower: dict | None = None, context: int = 77):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU, TextTransformer

        cfg = dict(CLIP_TEXT_B32, **(tower or {}))
        if not 1 <= context <= cfg["context_length"]:
            raise TesseraError(f"text context={context} must be in [1, {cfg['context_length']}]")
        self.context, self.width = int(context), int(cfg["width"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tower = TextTransformer(**cfg, act_layer=QuickGELU if quick_gelu else nn.GELU)
        self.tokenizer = SimpleTokenizer(context_length=cfg["context_length"])
        self.source = f"random weights (seed {seed})"
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise TesseraError(f"CLIP text encoder weights not found: {path}; point text_encoder_weights at "
                                   "a local ViT-B-32 state dict (.safetensors/.pt/.bin)")
            state = text_tower_state(_read_state(path), str(path))
            own = self.tower.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise TesseraError(f"{path} lacks CLIP text key '{missing[0]}' (+{len(missing) - 1} more); "
                                   "it is not a ViT-B-32 text tower")
            for key in own:
                if own[key].shape != state[key].shape:
                    raise TesseraError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, the ViT-B-32 "
                                       f"text tower needs {tuple(own[key].shape)}")
            self.tower.load_state_dict({k: state[k] for k in own}, strict=True)
            self.source = str(path)
        elif not allow_random:
            raise TesseraError(
                "the CLIP ViT-B/32 text encoder needs local weights: set model.text_encoder_weights=FILE "
                "(an open_clip or OpenAI ViT-B-32 state dict, .safetensors/.pt/.bin, e.g. "
                "~/.cache/tessera/clip/ViT-B-32.safetensors); tessera never downloads. "
                "Tests may set model.text_encoder_allow_random=true for random weights")
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions -> ids LongTensor[B, 77]: [SOT] bpe [EOT], zero padded, truncated with EOT last."""
        return self.tokenizer(list(captions))

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        device = self.tower.token_embedding.weight.device
        ids = self.tokenize(captions)[:, : self.context].to(device)
        L = ids.shape[1]
        x = self.tower.token_embedding(ids) + self.tower.positional_embedding[:L]
        mask = self.tower.attn_mask[:L, :L].to(device=device, dtype=x.dtype)
        x = self.tower.ln_final(self.tower.transformer(x, attn_mask=mask))
        return F.normalize(x.float(), dim=-1)


_ENCODERS: dict = {}


def get_text_encoder(**kwargs) -> CLIPTextEncoder:
    """One CLIPTextEncoder per distinct configuration in a process (priors and their EMA copies share it)."""
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = CLIPTextEncoder(**kwargs)
    return _ENCODERS[key]


class TextEncoderHandle:
    """What a prior keeps instead of a text-encoder submodule: not in state_dict, shared by deepcopy.

    ``encode(captions, device)`` -> [B, L, width] float32 on device; the features of up to ``cache_size``
    recent captions are kept (on CPU), which makes small caption vocabularies (the shapes set) nearly free.
    """

    def __init__(self, encoder: CLIPTextEncoder, cache_size: int = 1024):
        self.encoder, self.cache_size = encoder, int(cache_size)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __deepcopy__(self, memo):
        return self

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def context(self) -> int:
        return self.encoder.context

    def encode(self, captions: list[str], device) -> torch.Tensor:
        captions = [str(c) for c in captions]
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if todo:
            enc_device = self.encoder.tower.token_embedding.weight.device
            if enc_device != torch.device(device):
                self.encoder.to(device)
            feats = self.encoder(todo)
            if self.cache_size <= 0:
                fresh = dict(zip(todo, feats))
                return torch.stack([fresh[c] for c in captions]).to(device)
            for c, f in zip(todo, feats):
                self.cache[c] = f.cpu()
        out = []
        for c in captions:
            self.cache.move_to_end(c)
            out.append(self.cache[c])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return torch.stack(out).to(device)


def build_clip(weights: str | None = None, allow_random: bool = False, seed: int = 0, quick_gelu: bool = True):
    """The whole open_clip ViT-B/32 (image + text towers), eval mode, from a local state dict (CLIP score).

    With no file: random weights from ``seed`` when allow_random, else a TesseraError naming the file needed.
    """
    import open_clip

    if weights is None and not allow_random:
        raise TesseraError("the CLIP score needs local ViT-B-32 weights: pass --clip-weights FILE (an open_clip "
                           "or OpenAI ViT-B-32 state dict, .safetensors/.pt/.bin); tessera never downloads")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-B-32", pretrained=None, quick_gelu=quick_gelu)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TesseraError(f"CLIP weights not found: {path}; pass a local ViT-B-32 state dict")
        state = _read_state(path)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise TesseraError(f"{path} lacks CLIP key '{missing[0]}' (+{len(missing) - 1} more); "
                               "it is not a whole ViT-B-32 model")
        model.load_state_dict({k: state[k].float() for k in own}, strict=True)
    return model.eval().requires_grad_(False)
