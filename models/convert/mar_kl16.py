"""--from mar-kl16: the released KL-16 autoencoder of MAR (``kl16.ckpt``: {"model": state dict}) -> a kl run.

The released keys already use tessera's names (``encoder.down.{i}.block.{j}...``, ``quant_conv``, ...), so the
weights load one to one; the converter checks the layout (KL-16: 16 latent channels, stride 16, no decoder
attention outside the mid block), adds the ``scale_factor`` buffer (0.2325, the released model's value) and
writes the run directory. Only the autoencoder is in the file: the run evaluates, encodes and decodes; training
it further needs the loss section of configs/imagenet256/tokenizer/kl16.yaml.

    python convert_checkpoint.py --from mar-kl16 --ckpt kl16.ckpt --out runs/mar_kl16
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from engine.errors import TesseraError
from engine.legacy import legacy_load, state_dict_from
from models.convert import write_run

RELEASED_SCALE_FACTOR = 0.2325
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "imagenet256" / "tokenizer" / "kl16.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--scale-factor", type=float, default=RELEASED_SCALE_FACTOR,
                        help="latent scale stored with the weights (the released MAR models use 0.2325)")


def kl16_config(state: dict, config_path: str | None = None) -> dict:
    """The tessera config of the converted run: configs/imagenet256/tokenizer/kl16.yaml (or --config), with the
    latent width and channel base read from the weights."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_path or DEFAULT_CONFIG), resolve=True)
    for key in ("encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"):
        if key not in state:
            raise TesseraError(f"the checkpoint has no '{key}': not a KL autoencoder state dict")
    ae = cfg["model"]["autoencoder"]
    ae["ch"] = int(state["encoder.conv_in.weight"].shape[0])
    cfg["model"]["embed_dim"] = int(state["post_quant_conv.weight"].shape[1])
    ae["z_channels"] = int(state["post_quant_conv.weight"].shape[0])
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    if len(levels) != len(ae["ch_mult"]):
        raise TesseraError(f"the checkpoint has {len(levels)} encoder levels, the config {len(ae['ch_mult'])}; "
                           f"pass a matching --config")
    return cfg


def convert(args):
    ckpt = legacy_load(args.ckpt)
    state = {k: v.float() for k, v in state_dict_from(ckpt, ("model", "state_dict")).items() if torch.is_tensor(v)}
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # a training state may carry the loss
    cfg = kl16_config(state, args.config)
    state["scale_factor"] = torch.tensor(float(args.scale_factor))
    return write_run(args.out, cfg, state, "tokenizer")
