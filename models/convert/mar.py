"""--from mar: a released MAR checkpoint (``checkpoint-last.pth``: {"model", "model_ema", "args", ...}) -> a mar run.

The file pickles an argparse Namespace, so it is read with engine.legacy (nothing is executed). Sampling uses the
EMA weights (``model_ema``; --raw takes ``model``). The released keys already use tessera's names
(``encoder_blocks.{i}.attn.qkv``, ``diffloss.net.res_blocks.{j}.adaLN_modulation.1``, ...), so the state dict
loads one to one. The size is read from the weights: widths, depths, buffer size, class count, DiffLoss width
and depth, and the patch size (token channels / the tokenizer's latent channels). Head counts are not in the
weights: they come from the pickled args (model name), the published table (768 -> 12, 1024 / 1280 -> 16),
or --heads. The rest of the config (training recipe, sampling settings) comes from --config, else from the
imagenet256 MAR config of that width.

    python convert_checkpoint.py --from mar-kl16 --ckpt kl16.ckpt --out runs/mar_kl16
    python convert_checkpoint.py --from mar --ckpt mar_base/checkpoint-last.pth --tokenizer runs/mar_kl16 \
        --out runs/mar_b
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from engine.errors import TesseraError
from engine.legacy import legacy_load
from models.convert import write_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagenet256" / "prior"
SIZE_CONFIGS = {768: "mar_b.yaml", 1024: "mar_l.yaml", 1280: "mar_h.yaml"}
PUBLISHED_HEADS = {768: 12, 1024: 16, 1280: 16}
MODEL_NAME_HEADS = {"mar_base": 12, "mar_large": 16, "mar_huge": 16}


def add_arguments(parser) -> None:
    parser.add_argument("--raw", action="store_true", help="convert the raw weights ('model') instead of the EMA")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (encoder and decoder)")


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_model_config(state: dict, latent_channels: int, heads: int | None = None, saved_args=None) -> dict:
    """The ``model`` section of a mar config, from a released state dict."""
    required = ("z_proj.weight", "decoder_embed.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned",
                "diffloss.net.input_proj.weight", "encoder_blocks.0.mlp.fc1.weight")
    for key in required:
        if key not in state:
            raise TesseraError(f"the checkpoint has no '{key}': not a MAR state dict")
    enc_dim, token_dim = state["z_proj.weight"].shape
    dec_dim = state["decoder_embed.weight"].shape[0]
    seq_len = state["diffusion_pos_embed_learned"].shape[1]
    buffer_size = state["encoder_pos_embed_learned"].shape[1] - seq_len
    p2 = token_dim // latent_channels
    patch = round(p2**0.5)
    if patch * patch * latent_channels != token_dim:
        raise TesseraError(f"tokens of {token_dim} channels do not split into p x p patches of the tokenizer's "
                           f"{latent_channels} latent channels; pass the tokenizer the model was trained on")
    if heads is None and saved_args is not None:
        heads = MODEL_NAME_HEADS.get(str(getattr(saved_args, "model", "")))
    if heads is None:
        heads = PUBLISHED_HEADS.get(int(enc_dim))
    if heads is None:
        raise TesseraError(f"width {enc_dim} is not a published MAR size; pass --heads")
    dec_heads = heads if dec_dim == enc_dim else PUBLISHED_HEADS.get(int(dec_dim), heads)
    model = {
        "target": "mar",
        "patch_size": patch,
        "encoder_dim": int(enc_dim),
        "encoder_depth": _count(state, "encoder_blocks."),
        "encoder_heads": int(heads),
        "decoder_dim": int(dec_dim),
        "decoder_depth": _count(state, "decoder_blocks."),
        "decoder_heads": int(dec_heads),
        "mlp_ratio": state["encoder_blocks.0.mlp.fc1.weight"].shape[0] / enc_dim,
        "buffer_size": int(buffer_size),
        "diffloss_width": int(state["diffloss.net.input_proj.weight"].shape[0]),
        "diffloss_depth": _count(state, "diffloss.net.res_blocks."),
    }
    return model


def convert(args):
    from models import load_tokenizer

    if not args.tokenizer:
        raise TesseraError("--from mar needs --tokenizer RUN_DIR: the KL tokenizer run (e.g. from --from mar-kl16)")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.kind != "kl":
        raise TesseraError(f"{args.tokenizer} holds a '{tokenizer.kind}' tokenizer; MAR needs a kl tokenizer")
    ckpt = legacy_load(args.ckpt)
    key = "model" if args.raw else "model_ema"
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TesseraError(f"{args.ckpt} has no '{key}' entry (found: {found}); "
                           f"{'drop --raw' if args.raw else 'pass --raw to use the raw weights'}")
    state = {k: v.float() for k, v in ckpt[key].items() if torch.is_tensor(v)}
    saved_args = ckpt.get("args")
    model = infer_model_config(state, tokenizer.token_shape[0], args.heads, saved_args)
    template = args.config or CONFIGS / SIZE_CONFIGS.get(model["encoder_dim"], "mar_b.yaml")
    cfg = OmegaConf.to_container(OmegaConf.load(template), resolve=True)
    cfg["model"] = {**cfg.get("model", {}), **model}
    num_classes = int(state["class_emb.weight"].shape[0]) if "class_emb.weight" in state else 0
    cfg["num_classes"] = num_classes
    cfg.setdefault("data", {})["num_classes"] = num_classes
    cfg["data"]["resolution"] = int(tokenizer.resolution)
    cfg["tokenizer"] = str(Path(args.tokenizer).resolve())
    return write_run(args.out, cfg, state, "prior", tokenizer=tokenizer)
