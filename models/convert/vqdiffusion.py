"""``--from vqdiffusion``: a released VQ-Diffusion checkpoint -> a ``vqdiffusion`` prior run directory.

    python convert_checkpoint.py --from vqdiffusion --ckpt coco_learnable.pth --config coco_tune.yaml \
        --code-map help_folder/statistics/taming_vqvae_2887.pt --out runs/vqdiffusion_coco

What is read (without executing the pickle, engine.legacy):
  ``ema`` (default; ``--no-ema``: ``model``) -> the transformer: ``transformer.content_emb.*``,
      ``transformer.blocks.*`` (the unused ``attn2.mask`` buffers dropped), ``transformer.to_logits.*``,
      ``empty_text_embed`` (the learned null text, improved models), ``Lt_history`` / ``Lt_count``;
  ``condition_emb.*`` -> the CLIP ViT-B/32 text tower, written to OUT/text_encoder.safetensors (float32);
  ``content_codec.*`` -> the frozen VQGAN, written as a tessera tokenizer to OUT/tokenizer (Gumbel f8-8192
      or f16 VQGAN), unless ``--tokenizer`` names one already converted;
  ``--code-map`` (the released pruning map: entry i = pruned id of full code i) -> OUT/codes_used.npy and the
      prior's code maps, for the pruned text (2887) and ImageNet (974) models.
The architecture is read from the weights (layers, width, codes, steps, text / class / unconditional, conv
MLP, the 32-wide position table of the 16x16 models); heads come from --config (16 when absent, as in every
released model), as do the loss settings.
"""

import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from engine.errors import TesseraError
from engine.legacy import legacy_load
from models.conditioners import CLIP_TEXT_B32, text_tower_state
from models.convert import write_run

CODECS = {  # the published VQGANs inside VQ-Diffusion checkpoints (taming layout)
    "gumbel_f8": dict(ch=128, ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0,
                      resolution=256, z_channels=256),
    "f16": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                resolution=256, z_channels=256),
}
CODEC_PARTS = (("content_codec.enc.encoder.", "encoder."), ("content_codec.enc.quant_conv.", "quant_conv."),
               ("content_codec.enc.quantize.", "quantize."), ("content_codec.dec.post_quant_conv.", "post_quant_conv."),
               ("content_codec.dec.decoder.", "decoder."))
DROP = re.compile(r"^(log_|transformer\.blocks\.\d+\.attn2\.mask$|condition_emb\.|zero_vector)")


def add_arguments(p) -> None:
    p.add_argument("--code-map", default=None, help="released pruning map (.pt or .npy, full code id -> pruned id)")
    p.add_argument("--no-ema", action="store_true", help="convert the raw weights ('model') instead of 'ema'")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: --config, else 16)")


def _released_params(config_path) -> dict:
    """diffusion_config.params of a released yaml (plain data), or {}."""
    if not config_path:
        return {}
    path = Path(config_path)
    if not path.is_file():
        raise TesseraError(f"config not found: {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        return dict(cfg["model"]["params"]["diffusion_config"]["params"])
    except (KeyError, TypeError) as e:
        raise TesseraError(f"{path} has no model.params.diffusion_config.params; is it a VQ-Diffusion yaml?") from e


def transformer_state(ckpt: dict, use_ema: bool = True) -> dict:
    """The DiffusionTransformer's tensors, keys relative to it (``transformer.blocks...``, ``empty_text_embed``)."""
    if use_ema and isinstance(ckpt.get("ema"), dict):
        return {k: v for k, v in ckpt["ema"].items() if torch.is_tensor(v)}
    model = ckpt.get("model")
    if not isinstance(model, dict):
        raise TesseraError("the checkpoint has neither 'ema' nor 'model' weights; is it a VQ-Diffusion .pth?")
    return {k[len("transformer."):]: v for k, v in model.items() if k.startswith("transformer.") and torch.is_tensor(v)}


def infer_model(state: dict, heads: int, params: dict) -> tuple[dict, int, int]:
    """(tessera model config, number of codes K, class-table rows) of a released DiffusionTransformer."""
    emb = state.get("transformer.content_emb.emb.weight")
    if emb is None:
        raise TesseraError("no 'transformer.content_emb.emb.weight' in the checkpoint; not a VQ-Diffusion model")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k)))
    blk = "transformer.blocks.0."
    dim = int(emb.shape[1])
    text = f"{blk}attn2.key.weight" in state
    class_rows = state[f"{blk}ln2.emb.weight"].shape[0] if f"{blk}ln2.emb.weight" in state else 0
    model = {
        "target": "vqdiffusion",
        "condition": "text" if text else ("class" if class_rows else "none"),
        "dim": dim, "depth": depth, "heads": int(heads),
        "mlp": "conv" if f"{blk}mlp.conv1.weight" in state else "fc",
        "mlp_ratio": (state[f"{blk}mlp.conv1.weight"] if f"{blk}mlp.conv1.weight" in state
                      else state[f"{blk}mlp.0.weight"]).shape[0] / dim,
        "activation": "gelu2",
        "pos_grid": [int(state["transformer.content_emb.height_emb.weight"].shape[0]),
                     int(state["transformer.content_emb.width_emb.weight"].shape[0])],
        "num_steps": int(state[f"{blk}ln1.emb.weight"].shape[0]),
        "schedule": "mask",
        "aux_weight": float(params.get("auxiliary_loss_weight", 5e-4)),
        "adaptive_aux": bool(params.get("adaptive_auxiliary_loss", True)),
        "mask_weight": list(params.get("mask_weight", [1.0, 1.0])),
    }
    if class_rows:
        learned = bool(params.get("learnable_cf")) or class_rows == 1001  # the released null is label 1000
        model["class_null"] = "learned" if learned else "mean"
    if text:  # the learned null is used unless the released config says learnable_cf: false
        model["learnable_null"] = "empty_text_embed" in state and params.get("learnable_cf", True) is not False
    return model, int(emb.shape[0]) - 1, class_rows


def prior_weights(state: dict, model: dict) -> dict:
    """Released DiffusionTransformer keys -> tessera prior keys."""
    out = {}
    for key, value in state.items():
        if DROP.match(key):
            continue
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        elif key not in ("empty_text_embed", "Lt_history", "Lt_count"):
            raise TesseraError(f"unexpected key '{key}' in the VQ-Diffusion checkpoint")
        out[key] = value.float() if value.is_floating_point() else value
    if model["condition"] == "text" and not model.get("learnable_null"):
        out.pop("empty_text_embed", None)
    for buf in ("Lt_history", "Lt_count"):
        out.setdefault(buf, torch.zeros(model["num_steps"]))
    return out


def codec_run(model_state: dict, out_dir: Path) -> Path:
    """Write the checkpoint's content codec (taming layout) as a tessera tokenizer run directory."""
    weights = {}
    for src, dst in CODEC_PARTS:
        for key, value in model_state.items():
            if key.startswith(src) and torch.is_tensor(value):
                weights[dst + key[len(src):]] = value.float()
    if not weights:
        raise TesseraError("the checkpoint holds no content_codec.* weights; pass --tokenizer RUN (a converted "
                           "taming VQGAN)")
    if "quantize.proj.weight" in weights:
        k, dim = weights["quantize.embed.weight"].shape
        cfg = {"target": "vq_gumbel", "embed_dim": int(dim), "autoencoder": dict(CODECS["gumbel_f8"]),
               "quantizer": {"codebook_size": int(k), "kl_weight": 1e-8}}
    elif "quantize.embedding.weight" in weights:
        k, dim = weights["quantize.embedding.weight"].shape
        cfg = {"target": "vq", "embed_dim": int(dim), "autoencoder": dict(CODECS["f16"]),
               "quantizer": {"codebook_size": int(k), "beta": 0.25, "legacy_beta": True}}
        weights.update({"quantize.initialized": torch.tensor(1), "quantize.pretrain_steps_done": torch.tensor(0),
                        "quantize.num_updates": torch.tensor(0),
                        "quantize.steps_since_used": torch.zeros(int(k), dtype=torch.long)})
    else:
        raise TesseraError("the content codec's quantizer is neither Gumbel (proj/embed) nor a VQGAN codebook "
                           "(embedding.weight); the EMA-VQ codec of ITHQ is not supported: pass --tokenizer")
    return write_run(out_dir, {"model": cfg, "data": {"resolution": 256}}, weights, "tokenizer")


def read_code_map(path) -> np.ndarray:
    """The released full -> pruned map (int64 [K_full]) from a torch-saved tensor or .npy."""
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"code map not found: {path}")
    if path.suffix == ".npy":
        return np.load(path).astype(np.int64)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = legacy_load(path)
    if not torch.is_tensor(obj) or obj.ndim != 1:
        raise TesseraError(f"{path} is not a 1-D tensor of pruned code ids")
    return obj.long().numpy()


def text_encoder_file(ckpt: dict, transformer: dict, out_dir: Path) -> tuple[Path, dict]:
    """Extract the CLIP text tower to OUT/text_encoder.safetensors -> (path, text_tower overrides)."""
    from safetensors.torch import save_file

    source = {k: v for k, v in transformer.items() if k.startswith("condition_emb.")}
    if not source and isinstance(ckpt.get("model"), dict):
        source = {k: v for k, v in ckpt["model"].items() if k.startswith("transformer.condition_emb.")}
    if not source:
        raise TesseraError("text model without condition_emb.* (CLIP) weights in the checkpoint")
    tower = text_tower_state(source, "condition_emb")
    vocab, width = tower["token_embedding.weight"].shape
    found = dict(context_length=int(tower["positional_embedding"].shape[0]), vocab_size=int(vocab), width=int(width),
                 layers=1 + max(int(k.split(".")[2]) for k in tower if k.startswith("transformer.resblocks.")),
                 output_dim=int(tower["text_projection"].shape[1]))
    overrides = {k: v for k, v in found.items() if CLIP_TEXT_B32[k] != v}
    if overrides:
        overrides["heads"] = max(1, int(width) // 64)
    path = out_dir / "text_encoder.safetensors"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.items()}, str(path))
    return path, overrides


def convert(args) -> Path:
    from models import load_tokenizer

    out = Path(args.out)
    ckpt = legacy_load(args.ckpt)
    if not isinstance(ckpt, dict):
        raise TesseraError(f"{args.ckpt} is not a VQ-Diffusion checkpoint (a dict with 'model' / 'ema')")
    released = _released_params(args.config)
    heads = args.heads or int((released.get("transformer_config") or {}).get("params", {}).get("n_head", 16))
    state = transformer_state(ckpt, use_ema=not args.no_ema)
    model, num_codes, class_rows = infer_model(state, heads, released)

    tok_dir = Path(args.tokenizer) if args.tokenizer else codec_run(ckpt.get("model") or {}, out / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    weights = prior_weights(state, model)
    if args.code_map:
        full_to_code = read_code_map(args.code_map)
        if len(full_to_code) != tokenizer.codebook_size or int(full_to_code.max()) + 1 != num_codes:
            raise TesseraError(f"code map {args.code_map} maps {len(full_to_code)} codes to "
                               f"{int(full_to_code.max()) + 1}, but the tokenizer has {tokenizer.codebook_size} and "
                               f"the model {num_codes}")
        first = {}
        for full, code in enumerate(full_to_code.tolist()):
            first.setdefault(code, full)  # decoding takes the first full code of each pruned id
        used = np.array([first[c] for c in range(num_codes)], dtype=np.int64)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "codes_used.npy", used)
        model["remap"] = str((out / "codes_used.npy").resolve())
        weights["full_to_code"] = torch.from_numpy(full_to_code)
        weights["code_to_full"] = torch.from_numpy(used)
    elif num_codes != tokenizer.codebook_size:
        raise TesseraError(f"the model has {num_codes} codes but the tokenizer {tokenizer.codebook_size}: a pruned "
                           "model needs --code-map (help_folder/statistics/taming_vqvae_*.pt)")
    if model["condition"] == "text":
        path, tower = text_encoder_file(ckpt, state, out)
        model.update(text_encoder_weights=str(path.resolve()), text_context=77, text_quick_gelu=True)
        if tower:
            model["text_tower"] = tower
            model["text_context"] = tower.get("context_length", 77)
    num_classes = 0
    if model["condition"] == "class":
        num_classes = class_rows - (model["class_null"] == "learned")
    sampling = {"truncation_rate": 0.86}
    config = {"model": model, "tokenizer": str(tok_dir.resolve()), "num_classes": num_classes,
              "sampling": sampling, "data": {"resolution": int(getattr(tokenizer, "resolution", 256))}}
    return write_run(out, config, weights, "prior", tokenizer=tokenizer)
