"""Released RQ-Transformer (stage 2) -> tessera ``rqtransformer`` prior run directory.

    python convert_checkpoint.py --from rqvae --ckpt cc3m/stage1/model.pt --out runs/rqvae_cc3m
    python convert_checkpoint.py --from rqtransformer --ckpt cc3m/stage2/model.pt --tokenizer runs/rqvae_cc3m \
        --out runs/rqtransformer_cc3m [--text-vocab VOCAB.json --text-merges MERGES.txt]

The released transformer has no code embedding of its own: it reads the stage-1 codebook, so --tokenizer must
be the converted stage 1 of the same tarball (the run records a fingerprint of that codebook). Key map:
pos_emb_cond/hw/d -> pos_cond/spatial/depth, input_mlp -> input_proj, head_mlp -> depth_proj,
{body,head}_transformer.blocks.i -> {spatial,depth}_blocks.i (ln1/ln2 -> norm1/norm2, query/key/value ->
one qkv in that order, mlp.0/mlp.2 -> mlp.fc1/fc2), classifier -> classifiers.0, cond_classifier ->
text_classifier. A class-conditional model gets one extra condition row (the null class, set to the mean of
the class rows): the released models were trained without label dropout, so keep sampling.cfg = 1.
Text models (block_size_cond > 1) need the released BPE vocab/merges files (searched beside the checkpoint
when not given); they are copied into the run directory.
"""

import shutil
from pathlib import Path

import torch

from engine.errors import TesseraError
from models.convert.rqvae import Weights, _get, read_released


def add_arguments(parser) -> None:
    parser.add_argument("--ema", action="store_true", help="convert state_dict_ema instead of state_dict")
    parser.add_argument("--text-vocab", default=None, help="text models: the released BPE vocab (.json)")
    parser.add_argument("--text-merges", default=None, help="text models: the released BPE merges (.txt)")


def _find_text_file(ckpt: Path, given, suffix: str, what: str) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise TesseraError(f"--text-{what} {path} not found")
        return path
    for folder in (ckpt.parent, ckpt.parent.parent):
        found = sorted(p for p in folder.rglob(f"*{suffix}") if what in p.name)
        if found:
            return found[0]
    raise TesseraError(f"this is a text-conditional checkpoint: pass its BPE files with --text-vocab and "
                       f"--text-merges (no *{what}*{suffix} found near {ckpt})")


def prior_config(cfg: dict, tokenizer) -> tuple[dict, int]:
    """(tessera model config, num_classes) of a released stage-2 config.yaml."""
    arch = _get(cfg, "arch")
    if arch.get("type") != "rq-transformer":
        raise TesseraError(f"arch.type is {arch.get('type')!r}, not 'rq-transformer': not a released stage-2 config")
    for flag in ("input_emb_vqvae", "head_emb_vqvae", "cumsum_depth_ctx", "shared_cls_emb"):
        if not arch.get(flag, True):
            raise TesseraError(f"arch.{flag} is false; every released model sets it and only that layout is "
                               "supported")
    block = list(_get(cfg, "arch.block_size"))
    if tuple(block) != tuple(tokenizer.token_shape):
        raise TesseraError(f"the transformer models codes {block} but the tokenizer makes "
                           f"{list(tokenizer.token_shape)}; pass the stage 1 of the same release with --tokenizer")
    vocab = int(arch.get("vocab_size", _get(cfg, "dataset.vocab_size", tokenizer.codebook_size)))
    if vocab != tokenizer.codebook_size:
        raise TesseraError(f"the transformer has {vocab} codes, the tokenizer {tokenizer.codebook_size}")
    if int(arch.get("input_embed_dim", tokenizer.embed_dim)) != tokenizer.embed_dim:
        raise TesseraError(f"arch.input_embed_dim={arch['input_embed_dim']} but the tokenizer's codes are "
                           f"{tokenizer.embed_dim} wide")
    if arch.get("gelu", "v1") != "v1" or not arch.get("mlp_bias", True) or not arch.get("attn_bias", True):
        raise TesseraError("only the released block layout (gelu v1, biased attention and MLP) is supported")
    model = {
        "target": "rqtransformer",
        "dim": int(_get(cfg, "arch.embed_dim")),
        "heads": int(_get(cfg, "arch.body.block.n_head")),
        "spatial_layers": int(_get(cfg, "arch.body.n_layer")),
        "depth_layers": int(_get(cfg, "arch.head.n_layer")),
        "mlp_ratio": 4,
        "dropout": float(arch.get("resid_pdrop", 0.1)),
        "attn_dropout": float(arch.get("attn_pdrop", 0.0)),
        "embed_dropout": float(arch.get("embd_pdrop", 0.0)),
        "code_embedding": "tokenizer",
        "shared_classifier": True,
        "cond_dropout": 0.0,
        "norm_eps": 1e-5,
        "gelu": "exact",
    }
    head_heads = int(_get(cfg, "arch.head.block.n_head"))
    if head_heads != model["heads"]:
        raise TesseraError(f"body and head use different head counts ({model['heads']}, {head_heads}); "
                           "tessera uses one")
    cond_vocab, cond_len = int(arch.get("vocab_size_cond", 1)), int(arch.get("block_size_cond", 1))
    num_classes = 0
    if cond_len > 1:
        loss = cfg.get("loss", {}) or {}
        txt, img = float(loss.get("txt_weight", 0.1)), float(loss.get("img_weight", 0.9))
        model["text"] = {"tokenizer": "bpe", "vocab_size": cond_vocab, "length": cond_len,
                         "loss_weight": txt / (txt + img), "lowercase": True}
    elif cond_vocab > 1:
        num_classes = cond_vocab
    return model, num_classes


def sampling_config(cfg: dict, depth: int, codebook_size: int) -> dict:
    """The released config.yaml's sampling block (temp, top_k, top_p; scalars or per-depth lists)."""
    s = cfg.get("sampling") or {}
    sample = (cfg.get("experiment") or {}).get("sample") or {}
    out = {"temperature": float(s.get("temp", 1.0)), "top_k": 0, "top_p": 1.0, "cfg": 1.0}
    for key, depth_key, cast in (("top_k", "depth_top_k", int), ("top_p", "depth_top_p", float)):
        value = s.get(key, sample.get(key))
        if value is None:
            continue
        values = [cast(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if key == "top_k":
            values = [0 if v >= codebook_size else v for v in values]  # k >= K keeps everything
        if len(values) == 1:
            out[key] = values[0]
        elif len(values) == depth:
            out[depth_key] = values
        else:
            raise TesseraError(f"released sampling.{key} has {len(values)} values for {depth} depths")
    return out


def prior_weights(state: Weights, model: dict, num_classes: int, tokenizer) -> dict:
    from models.priors.rqtransformer import codebook_fingerprint

    out = {
        "pos_cond": state.take("pos_emb_cond"),
        "pos_spatial": state.take("pos_emb_hw"),
        "pos_depth": state.take("pos_emb_d"),
        "input_proj.weight": state.take("input_mlp.weight"),
        "input_proj.bias": state.take("input_mlp.bias"),
        "depth_proj.weight": state.take("head_mlp.weight"),
        "depth_proj.bias": state.take("head_mlp.bias"),
        "classifiers.0.norm.weight": state.take("classifier.layer_norm.weight"),
        "classifiers.0.norm.bias": state.take("classifier.layer_norm.bias"),
        "classifiers.0.linear.weight": state.take("classifier.linear.weight"),
        "classifiers.0.linear.bias": state.take("classifier.linear.bias"),
        "codebook_fingerprint": codebook_fingerprint(tokenizer.code_tables()),
    }
    cond = state.take("cond_emb.weight")
    if num_classes:  # append the null class row
        if cond.shape[0] != num_classes:
            raise TesseraError(f"cond_emb.weight has {cond.shape[0]} rows for {num_classes} classes")
        cond = torch.cat([cond, cond.mean(0, keepdim=True)])
    out["cond_emb.weight"] = cond
    if "text" in model:
        for name in ("layer_norm.weight", "layer_norm.bias", "linear.weight", "linear.bias"):
            ours = name.replace("layer_norm", "norm")
            out[f"text_classifier.{ours}"] = state.take(f"cond_classifier.{name}")
    for theirs, ours, n in (("body_transformer", "spatial_blocks", model["spatial_layers"]),
                            ("head_transformer", "depth_blocks", model["depth_layers"])):
        for i in range(n):
            a, b = f"{theirs}.blocks.{i}.", f"{ours}.{i}."
            for part in ("weight", "bias"):
                out[b + f"norm1.{part}"] = state.take(a + f"ln1.{part}")
                out[b + f"norm2.{part}"] = state.take(a + f"ln2.{part}")
                out[b + f"attn.qkv.{part}"] = torch.cat([state.take(a + f"attn.{x}.{part}")
                                                         for x in ("query", "key", "value")])
                out[b + f"attn.proj.{part}"] = state.take(a + f"attn.proj.{part}")
                out[b + f"mlp.fc1.{part}"] = state.take(a + f"mlp.0.{part}")
                out[b + f"mlp.fc2.{part}"] = state.take(a + f"mlp.2.{part}")
    state.check_all_used()
    return out


def convert(args) -> Path:
    from models import load_tokenizer
    from models.convert import write_run

    if not args.tokenizer:
        raise TesseraError("--from rqtransformer needs --tokenizer RUN_DIR: the converted stage 1 (--from rqvae) "
                           "of the same release, whose codebook the transformer reads")
    tok_dir = Path(args.tokenizer).resolve()
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.kind != "rq":
        raise TesseraError(f"--tokenizer {tok_dir} is a '{tokenizer.kind}' tokenizer; pass the converted RQ-VAE")
    raw, cfg = read_released(args.ckpt, args.config, getattr(args, "ema", False))
    model, num_classes = prior_config(cfg, tokenizer)
    out_dir = Path(args.out)
    if "text" in model:
        text_dir = out_dir / "text"
        text_dir.mkdir(parents=True, exist_ok=True)
        for what, suffix, given in (("vocab", ".json", getattr(args, "text_vocab", None)),
                                    ("merges", ".txt", getattr(args, "text_merges", None))):
            src = _find_text_file(Path(args.ckpt), given, suffix, what)
            dst = text_dir / f"{what}{suffix}"
            shutil.copyfile(src, dst)
            model["text"][what] = str(dst.resolve())
    weights = prior_weights(Weights(raw, str(args.ckpt)), model, num_classes, tokenizer)
    config = {
        "model": model,
        "tokenizer": str(tok_dir),
        "num_classes": num_classes,
        "sampling": sampling_config(cfg, tokenizer.depth, tokenizer.codebook_size),
        "data": {"name": "imagefolder" if num_classes else "folder", "root": None,
                 "resolution": int(tokenizer.resolution)},
    }
    return write_run(out_dir, config, weights, "prior", tokenizer=tokenizer)
