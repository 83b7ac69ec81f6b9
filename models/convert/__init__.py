"""Converters from released checkpoints to tessera run directories (see convert_checkpoint.py).

Each format module defines ``add_arguments(parser)`` (optional) and ``convert(args) -> Path``, which reads
the released files and calls ``write_run(out, config, weights, kind)``: config is the full tessera config
dict of the run, weights the state dict the built model loads strictly. ``write_run`` builds the model, loads the
weights strictly (every key used, every missing key named) and writes ``config.yaml`` + ``model.safetensors``.
"""

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from engine.checkpoint import export_safetensors, load_state_strict
from engine.config import save_config
from engine.errors import TesseraError

FORMATS = {
    "taming-vqgan": "models.convert.taming",
    "rqvae": "models.convert.rqvae",
    "rqtransformer": "models.convert.rqtransformer",
    "mar-kl16": "models.convert.mar_kl16",
    "mar": "models.convert.mar",
    "vqdiffusion": "models.convert.vqdiffusion",
}


def format_module(name: str):
    if name not in FORMATS:
        raise TesseraError(f"unknown checkpoint format '{name}'; known: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ModuleNotFoundError as e:
        if e.name == FORMATS[name]:
            raise TesseraError(f"the '{name}' converter is not part of this tessera build") from e
        raise


def write_run(out_dir, config: dict, weights: dict, kind: str, tokenizer=None) -> Path:
    """Build, load strictly, and save a run directory. kind: "tokenizer" | "prior"."""
    from models import build_prior, build_tokenizer

    out_dir = Path(out_dir)
    cfg = OmegaConf.create(config)
    if kind == "tokenizer":
        model = build_tokenizer(cfg.model)
    else:
        model = build_prior(cfg.model, tokenizer, num_classes=int(cfg.get("num_classes") or 0))
    load_state_strict(model, weights, "converted checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    export_safetensors(model.state_dict(), out_dir / "model.safetensors", {"converted": True})
    save_config(cfg, out_dir / "config.yaml")
    return out_dir
