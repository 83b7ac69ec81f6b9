"""Model registry and builders: configs name classes by short registered names (``target: vq``)."""

import inspect
import re
from pathlib import Path

from omegaconf import OmegaConf

from engine.errors import TesseraError
from models.registry import PRIORS, TOKENIZERS, lookup


def _construct(cls, params: dict, section: str, **extra):
    try:
        inspect.signature(cls).bind(**extra, **params)
    except TypeError as e:
        m = re.search(r"'(\w+)'", str(e))
        key = m.group(1) if m else str(e)
        if "missing" in str(e):
            raise TesseraError(f"{section} is missing the required key '{key}' for {cls.__name__}") from e
        raise TesseraError(f"unknown config key '{section}.{key}' for {cls.__name__}; check its spelling") from e
    try:
        return cls(**extra, **params)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m:
            raise TesseraError(f"unknown config key '{section}.<...>.{m.group(1)}' for {cls.__name__}") from e
        raise


def _params(model_cfg) -> tuple[str, dict]:
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    if "target" not in cfg:
        raise TesseraError("the config's model section has no 'target' (e.g. target: vq)")
    return cfg.pop("target"), cfg


def build_tokenizer(model_cfg):
    name, params = _params(model_cfg)
    return _construct(lookup(TOKENIZERS, name, "tokenizer"), params, "model")


def build_prior(model_cfg, tokenizer, num_classes: int = 0):
    """The prior sees the tokenizer through token_shape, codebook_size and kind (checked against accepts)."""
    name, params = _params(model_cfg)
    cls = lookup(PRIORS, name, "prior")
    if tokenizer.kind not in cls.accepts:
        raise TesseraError(
            f"prior '{name}' accepts tokenizers of kind {', '.join(cls.accepts)}, but the tokenizer is "
            f"'{tokenizer.kind}'; train a matching tokenizer or pick another prior"
        )
    extra = dict(token_shape=tuple(tokenizer.token_shape), num_classes=num_classes)
    if hasattr(tokenizer, "codebook_size"):
        extra["codebook_size"] = tokenizer.codebook_size
    if "tokenizer" in inspect.signature(cls).parameters:
        extra["tokenizer"] = tokenizer
    return _construct(cls, params, "model", **extra)


def load_tokenizer(run_dir, device="cpu", use_ema: bool = True):
    """A frozen tokenizer (eval mode, no grads) from a tessera run directory."""
    from engine.run_dir import load_weights, read_config

    run_dir = Path(run_dir)
    cfg = read_config(run_dir, "tokenizer")
    tok = build_tokenizer(cfg.model)
    load_weights(tok, run_dir, "model", use_ema=use_ema)
    return tok.to(device).eval().requires_grad_(False)


def load_prior(run_dir, device="cpu", use_ema: bool = True):
    """(prior, tokenizer, cfg) from a prior run directory; the tokenizer is found through cfg.tokenizer."""
    from engine.run_dir import load_weights, read_config

    run_dir = Path(run_dir)
    cfg = read_config(run_dir, "prior")
    tok_dir = Path(cfg.tokenizer)
    if not tok_dir.is_absolute() and not tok_dir.exists():
        tok_dir = run_dir / tok_dir
    tokenizer = load_tokenizer(tok_dir, device)
    prior = build_prior(cfg.model, tokenizer, num_classes=int(cfg.num_classes))
    load_weights(prior, run_dir, "model", use_ema=use_ema)
    return prior.to(device).eval().requires_grad_(False), tokenizer, cfg
