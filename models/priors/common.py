"""Input checks and optimiser groups that every prior shares."""

import torch
import torch.nn as nn

from engine.errors import TesseraError


def one_code_grid(token_shape, prior: str) -> tuple[int, int]:
    """A tokenizer's token_shape -> (h, w) for priors that model one code per cell: (h, w) or (h, w, 1)."""
    token_shape = tuple(int(s) for s in token_shape)
    if len(token_shape) == 3 and token_shape[2] != 1:
        raise TesseraError(f"{prior} models one code per cell but the tokenizer gives {token_shape[2]} codes per "
                           "cell (rq depth > 1); use the rqtransformer prior or an rq tokenizer with depth 1")
    if len(token_shape) not in (2, 3):
        raise TesseraError(f"{prior} needs a 2-D token grid (h, w), got token_shape {token_shape}")
    return token_shape[0], token_shape[1]


def check_code_grid(tokens: torch.Tensor, shape: tuple, codebook_size: int, prior: str,
                    what: str = "tokens") -> torch.Tensor:
    """tokens [B, *shape] of integer code ids -> LongTensor [B, prod(shape)], or one line saying what is wrong.

    A 2-D grid also accepts [B, h, w, 1] (an RQ tokenizer of depth 1).
    """
    shape = tuple(shape)
    if len(shape) == 2 and tokens.dim() == 4 and tokens.shape[-1] == 1:
        tokens = tokens[..., 0]
    if tokens.dim() != len(shape) + 1 or tuple(tokens.shape[1:]) != shape:
        raise TesseraError(f"{prior} expects {what} [B, {', '.join(map(str, shape))}], got {list(tokens.shape)}; "
                           "check that the prior was built for this tokenizer")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TesseraError(f"{prior} expects integer code ids as {what}, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codebook_size):
        raise TesseraError(f"code ids must be in [0, {codebook_size}), "
                           f"got values in [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens.reshape(tokens.shape[0], -1).long()


def class_labels(cond: dict | None, batch: int, num_classes: int, device, prior: str, *, drop_prob: float = 0.0,
                 allow_missing: bool = False) -> torch.Tensor:
    """cond["class"] -> class-table rows LongTensor [B]; row ``num_classes`` is the learned null class.

    Each label becomes the null class with probability ``drop_prob`` (label dropout, for classifier-free guidance).
    A class-conditional prior given no labels uses the null class only when ``allow_missing`` (sampling); an
    unconditional one (num_classes == 0) refuses labels.
    """
    null = torch.full((batch,), num_classes, dtype=torch.long, device=device)
    labels = cond.get("class") if cond else None
    if num_classes == 0:
        if labels is not None:
            raise TesseraError(f"this {prior} is unconditional (num_classes=0) but cond has 'class'; drop it")
        return null
    if labels is None:
        if allow_missing:
            return null
        raise TesseraError(f"this {prior} is class-conditional ({num_classes} classes) but cond has no 'class'")
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if labels.shape[0] != batch:
        raise TesseraError(f"cond['class'] has {labels.shape[0]} labels for a batch of {batch}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise TesseraError(f"class labels must be in [0, {num_classes}), got {labels.tolist()[:8]}")
    if drop_prob > 0:
        labels = torch.where(torch.rand(batch, device=device) < drop_prob, null, labels)
    return labels


def weight_decay_groups(model: nn.Module, weight_decay: float, decayed=(nn.Linear,)) -> list[dict]:
    """AdamW groups: decay on the weights of ``decayed`` layers only (not biases, norms, embeddings, position
    tables); a Linear weight tied to an embedding counts as an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, decayed)} - embeddings
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
