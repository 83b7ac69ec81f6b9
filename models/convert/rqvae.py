"""Released RQ-VAE (stage 1) -> tessera ``rq`` tokenizer run directory.

    python convert_checkpoint.py --from rqvae --ckpt imagenet_1.4B/stage1/model.pt --out runs/rqvae_in256

Reads ``model.pt`` (``{"state_dict": ...}``, optionally ``state_dict_ema`` with --ema) and the
``config.yaml`` beside it (or --config). The convnet keys are the taming layout tessera uses, so they map
one to one. Quantizer: ``quantizer.codebooks.{d}.weight`` [K + 1, C] (the last row is a zero padding entry,
dropped), ``cluster_size_ema`` -> ``cluster_size``, ``embed_ema`` -> ``embed_sum``; with a shared codebook
the D entries must hold the same tensor. Every key of the state dict is used; a missing one is an error
naming it.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from engine.errors import TesseraError
from engine.legacy import legacy_load


def add_arguments(parser) -> None:
    parser.add_argument("--ema", action="store_true", help="convert state_dict_ema instead of state_dict")


class Weights:
    """A released state dict that records which keys were used; ``take(key)`` fails naming a missing key."""

    def __init__(self, state: dict, what: str):
        self.state, self.what, self.used = state, what, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise TesseraError(f"{self.what} has no key '{key}'; is it a checkpoint of this format and config?")
        self.used.add(key)
        return self.state[key].float()

    def take_prefix(self, prefix: str) -> dict:
        """Every key starting with ``prefix`` (used), with the prefix kept."""
        return {k: self.take(k) for k in sorted(self.state) if k.startswith(prefix)}

    def check_all_used(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused:
            raise TesseraError(f"{self.what} has {len(unused)} key(s) the converter does not know, e.g. "
                               f"'{unused[0]}'; this checkpoint's architecture is not the released one")


def read_released(ckpt, config, ema: bool) -> tuple[dict, dict]:
    """(state dict, config dict) of a released model.pt and its config.yaml (default: beside the checkpoint)."""
    ckpt = Path(ckpt)
    config = Path(config) if config else ckpt.parent / "config.yaml"
    if not config.is_file():
        raise TesseraError(f"config {config} not found: the released config.yaml sits beside model.pt; "
                           f"pass --config")
    raw = legacy_load(ckpt)
    key = "state_dict_ema" if ema else "state_dict"
    if not isinstance(raw, dict) or not isinstance(raw.get(key), dict):
        found = ", ".join(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise TesseraError(f"{ckpt} has no '{key}' (found: {found}); pass a released RQ-VAE/RQ-Transformer model.pt")
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    return raw[key], cfg


def _get(cfg: dict, path: str, default=None, required: bool = True):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if required and default is None:
                raise TesseraError(f"released config has no '{path}'; is it an RQ-VAE / RQ-Transformer config.yaml?")
            return default
        node = node[part]
    return node


def tokenizer_config(cfg: dict) -> dict:
    """The tessera ``rq`` tokenizer config of a released stage-1 config.yaml."""
    if _get(cfg, "arch.type") != "rq-vae":
        raise TesseraError(f"arch.type is {_get(cfg, 'arch.type')!r}, not 'rq-vae': not a released RQ-VAE config")
    hp, dd = _get(cfg, "arch.hparams"), _get(cfg, "arch.ddconfig")
    if hp.get("bottleneck_type", "rq") != "rq":
        raise TesseraError(f"arch.hparams.bottleneck_type={hp['bottleneck_type']!r}; only 'rq' is supported")
    latent, code = list(_get(cfg, "arch.hparams.latent_shape")), list(_get(cfg, "arch.hparams.code_shape"))
    if latent[:2] != code[:2]:
        raise TesseraError(f"code_shape {code} is coarser than latent_shape {latent} (space-to-depth); no released "
                           "model does this and tessera does not support it")
    if dd.get("double_z"):
        raise TesseraError("arch.ddconfig.double_z is true; the RQ-VAE encoder has double_z false")
    n_embed, decay = hp["n_embed"], hp.get("decay", 0.99)
    if isinstance(n_embed, (list, tuple)):
        if len(set(n_embed)) != 1:
            raise TesseraError(f"per-depth codebook sizes {n_embed} are not supported; tessera uses one size")
        n_embed = n_embed[0]
    if isinstance(decay, (list, tuple)):
        decay = decay[0]
    if int(dd.get("out_ch", 3)) != 3 or int(dd.get("in_channels", 3)) != 3:
        raise TesseraError("arch.ddconfig: tessera tokenizers read and write RGB (in_channels = out_ch = 3)")
    autoencoder = {k: dd[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                     "resolution", "z_channels") if k in dd}
    pixel = "l2" if hp.get("loss_type", "l1") == "mse" else "l1"
    dataset = str(_get(cfg, "dataset.type", "", required=False)).lower()
    data_name = "lsun" if "lsun" in dataset else "folder" if "ffhq" in dataset else "imagefolder"
    return {
        "model": {
            "target": "rq",
            "embed_dim": int(hp["embed_dim"]),
            "autoencoder": autoencoder,
            "quantizer": {"codebook_size": int(n_embed), "depth": int(code[-1]),
                          "shared_codebook": bool(hp.get("shared_codebook", True)),
                          "beta": float(hp.get("latent_loss_weight", 0.25)), "ema_decay": float(decay),
                          "init": "random", "restart_after": 50 if hp.get("restart_unused_codes") else 0},
        },
        "loss": {"pixel": pixel, "perceptual_weight": 1.0, "disc_start": 0, "disc_weight": 0.75, "disc_layers": 2,
                 "disc_loss": "hinge", "codebook_weight": 1.0},
        "data": {"name": data_name, "root": None, "resolution": int(dd["resolution"])},
    }


def tokenizer_weights(state: Weights, model_cfg: dict) -> dict:
    """Map a released RQ-VAE state dict onto the tessera ``rq`` tokenizer's keys."""
    q = model_cfg["quantizer"]
    K, D, shared = q["codebook_size"], q["depth"], q["shared_codebook"]
    out = {}
    for prefix in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."):
        out.update(state.take_prefix(prefix))
    for j in range(1 if shared else D):
        depths = range(D) if shared else [j]
        book = {}
        for name in ("weight", "cluster_size_ema", "embed_ema"):
            copies = [state.take(f"quantizer.codebooks.{d}.{name}") for d in depths]
            if any(not torch.equal(copies[0], c) for c in copies[1:]):
                raise TesseraError(f"shared_codebook is true but quantizer.codebooks.*.{name} differ between "
                                   "depths; the checkpoint does not match its config")
            book[name] = copies[0]
        weight = book["weight"]
        if weight.shape[0] != K + 1:
            raise TesseraError(f"quantizer.codebooks.{j}.weight has {weight.shape[0]} rows, expected "
                               f"n_embed + 1 = {K + 1} (the codes and the padding row)")
        p = f"quantizer.codebooks.{j}."
        out[p + "embedding.weight"] = weight[:K].clone()
        out[p + "cluster_size"] = book["cluster_size_ema"]
        out[p + "embed_sum"] = book["embed_ema"]
        out[p + "initialized"] = torch.tensor(1)
        out[p + "pretrain_steps_done"] = torch.tensor(0)
        out[p + "num_updates"] = torch.tensor(0)
        out[p + "steps_since_used"] = torch.zeros(K, dtype=torch.long)
    state.check_all_used()
    return out


def convert(args) -> Path:
    from models.convert import write_run

    raw, cfg = read_released(args.ckpt, args.config, getattr(args, "ema", False))
    config = tokenizer_config(cfg)
    weights = tokenizer_weights(Weights(raw, str(args.ckpt)), config["model"])
    return write_run(args.out, config, weights, "tokenizer")
