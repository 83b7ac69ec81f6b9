"""``--from taming-vqgan``: a published VQGAN (Lightning ``.ckpt`` + its ``model.yaml``) -> a ``kind: vq``
tokenizer run directory.

    python convert_checkpoint.py --from taming-vqgan --ckpt vqgan_imagenet_f16_16384/ckpts/last.ckpt \
        --config vqgan_imagenet_f16_16384/configs/model.yaml --out runs/vqgan_f16_16384

Handles VQModel (f16-1024, f16-16384: ``target: vq``, nearest-code quantizer with the legacy loss weighting
commit + 0.25 * codebook), GumbelVQ (the f8-8192 of the text models: ``target: vq_gumbel``), and combined
VQGAN + GPT checkpoints (Net2NetTransformer), whose first stage sits under ``first_stage_model.`` and whose
project.yaml nests its config under ``first_stage_config``. ``loss.*`` (LPIPS, discriminator) is dropped.
The checkpoint is unpickled without executing anything (engine.legacy); the yaml is read as plain data.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from engine.errors import TesseraError
from engine.legacy import legacy_load, state_dict_from
from models.convert import write_run

AUTOENCODER_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resolution", "z_channels",
                    "in_channels")


def add_arguments(p) -> None:
    p.add_argument("--prefix", default=None,
                   help="key prefix of the VQGAN in the checkpoint (default: first_stage_model. for combined "
                        "VQGAN + GPT checkpoints, none otherwise)")


def first_stage_config(cfg: dict) -> tuple[str, dict, str]:
    """The taming config dict -> (class name, VQModel/GumbelVQ params, key prefix of its weights)."""
    model = cfg.get("model", cfg)
    target = str(model.get("target", ""))
    params = dict(model.get("params") or {})
    if target.endswith("Net2NetTransformer"):
        first = params.get("first_stage_config") or {}
        return str(first.get("target", "")).rsplit(".", 1)[-1], dict(first.get("params") or {}), "first_stage_model."
    return target.rsplit(".", 1)[-1], params, ""


def tessera_config(name: str, params: dict) -> dict:
    """A tessera tokenizer config (model + data.resolution) from VQModel / GumbelVQ params."""
    if name not in ("VQModel", "GumbelVQ", "VQNoDiscModel"):
        raise TesseraError(f"taming model '{name}' is not a VQModel or GumbelVQ; pass the first stage's model.yaml "
                           "(or a Net2NetTransformer project.yaml)")
    dd = dict(params.get("ddconfig") or {})
    missing = [k for k in ("ch", "ch_mult", "z_channels", "resolution") if k not in dd]
    if missing or "n_embed" not in params or "embed_dim" not in params:
        raise TesseraError(f"taming config lacks {missing or ['n_embed/embed_dim']}; is it a VQGAN model.yaml?")
    if dd.get("double_z"):
        raise TesseraError("taming ddconfig.double_z=true is a KL autoencoder, not a VQGAN")
    if int(dd.get("out_ch", 3)) != int(dd.get("in_channels", 3)):
        raise TesseraError("tessera VQ tokenizers decode to their input channels; out_ch != in_channels")
    ae = {k: dd[k] for k in AUTOENCODER_KEYS if k in dd}
    ae["ch_mult"], ae["attn_resolutions"] = list(ae["ch_mult"]), list(ae.get("attn_resolutions", []))
    n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
    if name == "GumbelVQ":
        if embed_dim != int(dd["z_channels"]):
            raise TesseraError("a GumbelVQ with embed_dim != z_channels is not supported")
        quantizer = {"codebook_size": n_embed, "kl_weight": float(params.get("kl_weight", 1e-8)), "temperature": 1.0}
        target = "vq_gumbel"
    else:
        quantizer = {"codebook_size": n_embed, "beta": 0.25, "legacy_beta": True, "codebook_update": "grad",
                     "init": "random"}
        target = "vq"
    model = {"target": target, "embed_dim": embed_dim, "autoencoder": ae, "quantizer": quantizer}
    return {"model": model, "data": {"resolution": int(dd["resolution"])}}


def tessera_weights(state: dict, model_cfg: dict, prefix: str = "") -> dict:
    """Published VQGAN keys (optionally under ``prefix``) -> the tessera tokenizer's state dict."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix) or not torch.is_tensor(value):
            continue
        key = key[len(prefix):]
        if key.startswith("loss."):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    if not any(k.startswith("encoder.") for k in out):
        raise TesseraError(f"no VQGAN weights under prefix '{prefix}' (no '{prefix}encoder.*' keys); "
                           "check --prefix")
    if model_cfg["target"] == "vq":
        k = int(model_cfg["quantizer"]["codebook_size"])
        out.update({"quantize.initialized": torch.tensor(1), "quantize.pretrain_steps_done": torch.tensor(0),
                    "quantize.num_updates": torch.tensor(0),
                    "quantize.steps_since_used": torch.zeros(k, dtype=torch.long)})
    return out


def convert(args) -> Path:
    if not args.config:
        raise TesseraError("--from taming-vqgan needs --config: the checkpoint's model.yaml (or project.yaml); "
                           "the .ckpt holds no architecture")
    path = Path(args.config)
    if not path.is_file():
        raise TesseraError(f"config not found: {path}")
    name, params, prefix = first_stage_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    config = tessera_config(name, params)
    state = state_dict_from(legacy_load(args.ckpt), keys=("state_dict",))
    if args.prefix is not None:
        prefix = args.prefix
    elif not prefix and not any(k.startswith("encoder.") for k in state) and any(
            k.startswith("first_stage_model.") for k in state):
        prefix = "first_stage_model."
    weights = tessera_weights(state, config["model"], prefix)
    return write_run(args.out, config, weights, "tokenizer")
