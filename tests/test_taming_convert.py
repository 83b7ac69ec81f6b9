"""Converters of published checkpoints: taming VQGANs (f16-1024 / f16-16384 key listings, Gumbel f8, combined
VQGAN + GPT) and VQ-Diffusion transformers. Synthetic checkpoints in the published key layout (random
weights, reduced width where the layout allows) convert, load strictly, and reproduce the outputs of an
independent functional forward pass written from the published architecture."""

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from engine.checkpoint import load_state_strict
from engine.errors import TesseraError
from models import build_tokenizer, load_prior, load_tokenizer
from models.convert import taming, vqdiffusion
from samplers.rng import streams
from tests.conftest import run_cli

KEYS = Path(__file__).resolve().parent / "data" / "keys"  # published state-dict key listings


def read_listing(name: str) -> dict[str, tuple]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        if line.strip():
            key, shape = line.strip().split(" ", 1)
            out[key] = tuple(int(v) for v in shape.strip("[]").split(",") if v.strip())
    return out


def random_tensor(key: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(7)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if "norm" in key and key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


F16_DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)


def vqgan_yaml(n_embed: int, dd: dict, target="taming.models.vqgan.VQModel", embed_dim=256, **extra) -> dict:
    return {"model": {"base_learning_rate": 4.5e-6, "target": target,
                      "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd,
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                "params": {"disc_start": 0, "disc_weight": 0.75}}, **extra}}}


def lightning_ckpt(state: dict, path: Path) -> Path:
    """A Lightning-style checkpoint: weights plus training state and a pickled Namespace."""
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}], "lr_schedulers": [],
                "hparams": argparse.Namespace(lr=4.5e-6, name="vqgan")}, path)
    return path


# ----------------------------------------------------------------------------- a functional taming VQGAN


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _resblock(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2", padding=1)
    return (_conv(x, sd, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p):
    B, C, H, W = x.shape
    h = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(h, sd, f"{p}.{n}").reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    return x + _conv(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W), sd, f"{p}.proj_out")


def _stage(x, sd, p, n_blocks):
    for j in range(n_blocks):
        x = _resblock(x, sd, f"{p}.block.{j}")
        if f"{p}.attn.{j}.norm.weight" in sd:
            x = _attn(x, sd, f"{p}.attn.{j}")
    return x


def _mid(x, sd, p):
    return _resblock(_attn(_resblock(x, sd, f"{p}.block_1"), sd, f"{p}.attn_1"), sd, f"{p}.block_2")


def ref_encode(sd, x, levels, nrb, gumbel=False):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(levels):
        h = _stage(h, sd, f"encoder.down.{i}", nrb)
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _conv(F.silu(_gn(_mid(h, sd, "encoder.mid"), sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    z = _conv(h, sd, "quant_conv").permute(0, 2, 3, 1)
    if gumbel:
        return _conv(z.permute(0, 3, 1, 2), sd, "quantize.proj").argmax(1)
    codes = sd["quantize.embedding.weight"]
    return torch.cdist(z.reshape(-1, z.shape[-1]), codes).argmin(-1).reshape(z.shape[:3])


def ref_decode(sd, ids, levels, nrb, gumbel=False):
    codes = sd["quantize.embed.weight"] if gumbel else sd["quantize.embedding.weight"]
    h = _conv(codes[ids].permute(0, 3, 1, 2), sd, "post_quant_conv")
    h = _mid(_conv(h, sd, "decoder.conv_in", padding=1), sd, "decoder.mid")
    for i in reversed(range(levels)):
        h = _stage(h, sd, f"decoder.up.{i}", nrb + 1)
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv",
                      padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


# ----------------------------------------------------------------------------- taming VQGAN


@pytest.mark.parametrize("listing,n_embed", [("taming_vqgan_f16_1024_state_dict_keys.txt", 1024),
                                             ("taming_vqgan_f16_16384_state_dict_keys.txt", 16384)])
def test_full_size_published_key_listing_loads_strictly(listing, n_embed):
    keys = read_listing(listing)
    state = {k: torch.empty(shape) if not k.endswith("num_batches_tracked") else torch.tensor(0)
             for k, shape in keys.items()}
    cfg = taming.tessera_config(*taming.first_stage_config(vqgan_yaml(n_embed, F16_DD))[:2])
    weights = taming.tessera_weights(state, cfg["model"])
    assert not any(k.startswith("loss.") for k in weights)
    assert len([k for k in keys if not k.startswith("loss.")]) == 343
    model = build_tokenizer(cfg["model"])
    load_state_strict(model, weights, listing)
    assert model.token_shape == (16, 16) and model.codebook_size == n_embed
    assert model.quantize.legacy_beta and model.quantize.beta == 0.25


def reduced_f16_state(listing: str, g) -> dict:
    """The published f16 key layout at a quarter of the width (ch 32, z 64), codebook kept."""
    scale = {128: 32, 256: 64, 512: 128}
    state = {}
    for key, shape in read_listing(listing).items():
        if key == "quantize.embedding.weight":
            shape = (shape[0], 64)
        elif not key.startswith("loss."):
            shape = tuple(scale.get(d, d) if i < 2 else d for i, d in enumerate(shape))
        state[key] = random_tensor(key, shape, g)
    return state


def test_f16_vqgan_converts_and_matches_the_published_forward(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = reduced_f16_state("taming_vqgan_f16_1024_state_dict_keys.txt", g)
    dd = dict(F16_DD, ch=32, z_channels=64, resolution=64, attn_resolutions=[4])
    (tmp_path / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(vqgan_yaml(1024, dd, embed_dim=64))))
    ckpt = lightning_ckpt(state, tmp_path / "last.ckpt")
    out = run_cli("convert_checkpoint.py", "--from", "taming-vqgan", "--ckpt", ckpt,
                  "--config", tmp_path / "model.yaml", "--out", tmp_path / "run")
    assert "wrote" in out.stdout
    tok = load_tokenizer(tmp_path / "run")
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ids = ref_encode(state, x, 5, 2)
        assert torch.equal(tok.encode(x), ids)
        torch.testing.assert_close(tok.decode(ids), ref_decode(state, ids, 5, 2).clamp(-1, 1), rtol=0, atol=1e-4)
    # combined VQGAN + GPT checkpoint: the first stage under first_stage_model.
    project = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                         "params": {"first_stage_config": vqgan_yaml(1024, dd, embed_dim=64)["model"],
                                    "cond_stage_config": "__is_unconditional__",
                                    "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT"}}}}
    (tmp_path / "project.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(project)))
    combined = {f"first_stage_model.{k}": v for k, v in state.items() if not k.startswith("loss.")}
    combined["transformer.tok_emb.weight"] = torch.zeros(1024, 8)
    args = argparse.Namespace(ckpt=lightning_ckpt(combined, tmp_path / "gpt.ckpt"), config=tmp_path / "project.yaml",
                              out=tmp_path / "run2", prefix=None)
    tok2 = load_tokenizer(taming.convert(args))
    with torch.no_grad():
        assert torch.equal(tok2.encode(x), ids)
    bad = argparse.Namespace(ckpt=ckpt, config=tmp_path / "model.yaml", out=tmp_path / "run3", prefix="nope.")
    with pytest.raises(TesseraError, match="prefix"):
        taming.convert(bad)


GUMBEL_AE = dict(z_channels=64, resolution=32, ch=32, ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[8],
                 dropout=0.0)  # the f8 layout at reduced width
GUMBEL_DD = dict(GUMBEL_AE, double_z=False, in_channels=3, out_ch=3)


def gumbel_state(g, n_embed=40) -> dict:
    """The published GumbelVQ layout: encoder/decoder/quant convs as VQModel, quantize.proj + quantize.embed."""
    ref = build_tokenizer({"target": "vq", "embed_dim": 64, "autoencoder": GUMBEL_AE,
                           "quantizer": {"codebook_size": n_embed}}).state_dict()
    state = {k: random_tensor(k, tuple(v.shape), g) for k, v in ref.items() if not k.startswith("quantize.")}
    state["quantize.proj.weight"] = random_tensor("proj", (n_embed, 64, 1, 1), g)
    state["quantize.proj.bias"] = random_tensor("proj.bias", (n_embed,), g)
    state["quantize.embed.weight"] = torch.randn(n_embed, 64, generator=g)
    state["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    return state


def test_gumbel_f8_vqgan_converts_and_matches_the_published_forward(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = gumbel_state(g)
    yaml = vqgan_yaml(40, GUMBEL_DD, target="taming.models.vqgan.GumbelVQ", embed_dim=64, kl_weight=1e-8,
                      temperature_scheduler_config={"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"})
    (tmp_path / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(yaml)))
    args = argparse.Namespace(ckpt=lightning_ckpt(state, tmp_path / "last.ckpt"), config=tmp_path / "model.yaml",
                              out=tmp_path / "run", prefix=None)
    tok = load_tokenizer(taming.convert(args))
    assert type(tok).registered_name == "vq_gumbel" and tok.kind == "vq" and tok.codebook_size == 40
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ids = ref_encode(state, x, 4, 2, gumbel=True)
        assert torch.equal(tok.encode(x), ids) and tok.token_shape == (4, 4)
        torch.testing.assert_close(tok.decode(ids), ref_decode(state, ids, 4, 2, gumbel=True).clamp(-1, 1),
                                   rtol=0, atol=1e-4)
        x_hat, q = tok.train()(x)  # training forward: Gumbel-softmax straight-through, KL to uniform
        assert x_hat.shape == x.shape and torch.isfinite(q.loss)


# ----------------------------------------------------------------------------- VQ-Diffusion


def _ln(x, sd=None, p=None):
    w, b = (sd[f"{p}.weight"], sd[f"{p}.bias"]) if sd is not None else (None, None)
    return F.layer_norm(x, x.shape[-1:], w, b, eps=1e-5)


def _lin(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _ada(x, sd, p, ids):
    scale, shift = _lin(F.silu(sd[f"{p}.emb.weight"][ids]), sd, f"{p}.linear")[:, None].chunk(2, -1)
    return _ln(x) * (1 + scale) + shift


def _mha(x, ctx, sd, p, heads):
    B, N, D = x.shape
    q = _lin(x, sd, f"{p}.query").view(B, N, heads, -1).transpose(1, 2)
    k = _lin(ctx, sd, f"{p}.key").view(B, ctx.shape[1], heads, -1).transpose(1, 2)
    v = _lin(ctx, sd, f"{p}.value").view(B, ctx.shape[1], heads, -1).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return _lin((att @ v).transpose(1, 2).reshape(B, N, D), sd, f"{p}.proj")


def ref_transformer(sd, x_t, t_code, heads, grid, context=None, labels=None):
    """The released Text2Image / Condition2Image transformer as a function of its state dict -> [B, N, K]."""
    pre = "transformer."
    H, W = sd[f"{pre}content_emb.height_emb.weight"].shape[0], sd[f"{pre}content_emb.width_emb.weight"].shape[0]
    pos = (sd[f"{pre}content_emb.height_emb.weight"][:, None] + sd[f"{pre}content_emb.width_emb.weight"][None])
    x = sd[f"{pre}content_emb.emb.weight"][x_t] + pos.reshape(H * W, -1)[: x_t.shape[1]]
    gelu2 = lambda y: y * torch.sigmoid(1.702 * y)  # noqa: E731
    i = 0
    while f"{pre}blocks.{i}.ln1.emb.weight" in sd:
        p = f"{pre}blocks.{i}"
        if context is not None:
            h = _ada(x, sd, f"{p}.ln1", t_code)
            x = x + _mha(h, h, sd, f"{p}.attn1", heads)
            x = x + _mha(_ada(x, sd, f"{p}.ln1_1", t_code), context, sd, f"{p}.attn2", heads)
        else:
            h = _ada(x, sd, f"{p}.ln1", t_code)
            x = x + _mha(h, h, sd, f"{p}.attn", heads)
        h = _ada(x, sd, f"{p}.ln2", labels) if labels is not None else _ln(x, sd, f"{p}.ln2")
        if f"{p}.mlp.conv1.weight" in sd:
            B, N, D = h.shape
            y = h.transpose(1, 2).reshape(B, D, *grid)
            y = _conv(gelu2(_conv(y, sd, f"{p}.mlp.conv1", padding=1)), sd, f"{p}.mlp.conv2", padding=1)
            x = x + y.flatten(2).transpose(1, 2)
        else:
            x = x + _lin(gelu2(_lin(h, sd, f"{p}.mlp.0")), sd, f"{p}.mlp.2")
        i += 1
    return _lin(_ln(x, sd, f"{pre}to_logits.0"), sd, f"{pre}to_logits.1")


def released_transformer(g, *, K, D=32, depth=2, T=10, N=16, pos=(4, 4), text_dim=None, class_rows=0, conv=False):
    """A DiffusionTransformer state dict (keys relative to it, as in a checkpoint's 'ema')."""
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"transformer.content_emb.emb.weight": r(K + 1, D), "transformer.content_emb.height_emb.weight": r(pos[0], D),
          "transformer.content_emb.width_emb.weight": r(pos[1], D)}
    for i in range(depth):
        p = f"transformer.blocks.{i}"

        def ada(name, rows, p=p):
            return {f"{p}.{name}.emb.weight": r(rows, D), f"{p}.{name}.linear.weight": r(2 * D, D),
                    f"{p}.{name}.linear.bias": r(2 * D)}

        def lin(name, o, i_, p=p):
            return {f"{p}.{name}.weight": r(o, i_), f"{p}.{name}.bias": r(o)}

        sd.update(ada("ln1", T))
        attn = "attn1" if text_dim else "attn"
        for n in ("key", "query", "value", "proj"):
            sd.update(lin(f"{attn}.{n}", D, D))
        if text_dim:
            sd.update(ada("ln1_1", T))
            sd.update(lin("attn2.key", D, text_dim) | lin("attn2.query", D, D) | lin("attn2.value", D, text_dim)
                      | lin("attn2.proj", D, D))
            sd[f"{p}.attn2.mask"] = torch.tril(torch.ones(1, 1, N, N))  # the unused causal buffer
        if class_rows:
            sd.update(ada("ln2", class_rows))
        else:
            sd.update({f"{p}.ln2.weight": 1 + r(D), f"{p}.ln2.bias": r(D)})
        if conv:
            sd.update({f"{p}.mlp.conv1.weight": r(4 * D, D, 3, 3), f"{p}.mlp.conv1.bias": r(4 * D),
                       f"{p}.mlp.conv2.weight": r(D, 4 * D, 3, 3), f"{p}.mlp.conv2.bias": r(D)})
        else:
            sd.update(lin("mlp.0", 4 * D, D) | lin("mlp.2", D, 4 * D))
    sd.update({"transformer.to_logits.0.weight": 1 + r(D), "transformer.to_logits.0.bias": r(D),
               "transformer.to_logits.1.weight": r(K, D), "transformer.to_logits.1.bias": r(K)})
    for name in ("log_at", "log_bt", "log_ct", "log_1_min_ct"):
        sd[name] = torch.zeros(T)
    for name in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct", "log_1_min_cumprod_ct"):
        sd[name] = torch.zeros(T + 1)
    sd["Lt_history"], sd["Lt_count"] = torch.rand(T, generator=g), torch.full((T,), 12.0)
    return sd


def test_vqdiffusion_text_checkpoint_converts_and_matches_the_released_transformer(tmp_path):
    from models.conditioners import CLIPTextEncoder

    g = torch.Generator().manual_seed(2)
    # the frozen codec: a tiny Gumbel VQGAN with 40 codes, of which the model uses 20 (+ catch-all 0)
    yaml = vqgan_yaml(40, GUMBEL_DD, target="taming.models.vqgan.GumbelVQ", embed_dim=64)
    (tmp_path / "vq.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(yaml)))
    tok_dir = taming.convert(argparse.Namespace(ckpt=lightning_ckpt(gumbel_state(g), tmp_path / "vq.ckpt"),
                                                config=tmp_path / "vq.yaml", out=tmp_path / "tok", prefix=None))
    full_to_pruned = torch.zeros(40, dtype=torch.long)
    full_to_pruned[torch.arange(1, 40, 2)[:19]] = torch.arange(1, 20)
    torch.save(full_to_pruned, tmp_path / "map.pt")
    clip = CLIPTextEncoder(allow_random=True, tower=dict(width=64, heads=1, layers=2), context=77, seed=3)
    clip_state = {f"condition_emb.{k}": v.half() if v.ndim == 2 and "embedding" not in k else v
                  for k, v in clip.tower.state_dict().items()}
    ema = released_transformer(g, K=20, text_dim=64)
    ema["empty_text_embed"] = torch.randn(77, 64, generator=g, dtype=torch.float64)
    ema.update(clip_state)
    model = {f"transformer.{k}": v + 1 if v.is_floating_point() else v for k, v in ema.items()}  # non-EMA differs
    torch.save({"last_epoch": 3, "last_iter": 99, "model": model, "ema": ema, "clip_grad_norm": {"max_norm": 0.5},
                "optimizer_and_scheduler": {"none": {"name": "none"}}}, tmp_path / "coco_learnable.pth")
    released = {"model": {"params": {"diffusion_config": {"params": {
        "diffusion_step": 10, "auxiliary_loss_weight": 5e-4, "adaptive_auxiliary_loss": True, "learnable_cf": True,
        "transformer_config": {"params": {"n_head": 4}}}}}}}
    (tmp_path / "coco.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(released)))
    vqdiffusion.convert(argparse.Namespace(ckpt=tmp_path / "coco_learnable.pth", config=tmp_path / "coco.yaml",
                                           tokenizer=tok_dir, code_map=tmp_path / "map.pt", no_ema=False, heads=None,
                                           out=tmp_path / "run"))
    prior, tokenizer, cfg = load_prior(tmp_path / "run")
    assert prior.codebook_size == 20 and prior.condition == "text" and cfg.model.heads == 4
    captions = ["a red bird on a branch", "a small blue bird"]
    x_t = torch.randint(0, 21, (2, 16), generator=g)
    t_code = torch.tensor([3, 9])
    with torch.no_grad():
        context = clip(captions)[:, :77]
        ours = prior.x0_logits(x_t, t_code + 1, prior.text.encode(captions, "cpu"))
        torch.testing.assert_close(ours, ref_transformer(ema, x_t, t_code, 4, (4, 4), context=context),
                                   rtol=0, atol=2e-3)  # the CLIP weights were stored as fp16
        torch.testing.assert_close(prior.null_text(1, "cpu")[0], ema["empty_text_embed"].float())
    assert prior.code_to_full.tolist() == [0] + list(range(1, 39, 2))
    assert torch.equal(prior.full_to_code, full_to_pruned)
    assert torch.equal(prior.Lt_history, ema["Lt_history"])
    tokens = prior.sample({"text": captions}, streams(0, range(2)), num_steps=4, cfg=3.0)
    assert tokens.shape == (2, 4, 4) and set(tokens.unique().tolist()) <= set(prior.code_to_full.tolist())
    with pytest.raises(TesseraError, match="code-map"):
        vqdiffusion.convert(argparse.Namespace(ckpt=tmp_path / "coco_learnable.pth", config=None, tokenizer=tok_dir,
                                               code_map=None, no_ema=False, heads=None, out=tmp_path / "bad"))


def test_vqdiffusion_class_checkpoint_with_conv_mlp_and_the_32_wide_position_table(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(4)
    # the codec comes from the checkpoint itself (content_codec.*), as in the released files
    monkeypatch.setitem(vqdiffusion.CODECS, "f16", GUMBEL_AE)
    codec = build_tokenizer({"target": "vq", "embed_dim": 64, "autoencoder": GUMBEL_AE,
                             "quantizer": {"codebook_size": 12}}).state_dict()
    codec = {k: random_tensor(k, tuple(v.shape), g) for k, v in codec.items() if k.split(".")[-1] in ("weight", "bias")}
    names = {"encoder.": "content_codec.enc.encoder.", "quant_conv.": "content_codec.enc.quant_conv.",
             "quantize.": "content_codec.enc.quantize.", "post_quant_conv.": "content_codec.dec.post_quant_conv.",
             "decoder.": "content_codec.dec.decoder."}
    model_state = {}
    for k, v in codec.items():
        prefix = next(p for p in names if k.startswith(p))
        model_state[names[prefix] + k[len(prefix):]] = v
        if prefix == "quantize.":
            model_state["content_codec.dec.quantize." + k[len(prefix):]] = v
    ema = released_transformer(g, K=12, pos=(8, 8), class_rows=6, conv=True)  # v1: 6 classes, no null row
    model_state.update({f"transformer.{k}": v for k, v in ema.items()})
    torch.save({"model": model_state, "ema": ema}, tmp_path / "imagenet_learnable.pth")
    vqdiffusion.convert(argparse.Namespace(ckpt=tmp_path / "imagenet_learnable.pth", config=None, tokenizer=None,
                                           code_map=None, no_ema=False, heads=2, out=tmp_path / "run"))
    prior, tokenizer, cfg = load_prior(tmp_path / "run")
    assert cfg.num_classes == 6 and prior.condition == "class" and list(cfg.model.pos_grid) == [8, 8]
    assert cfg.model.class_null == "mean"  # guidance uses the mean class embedding, as the released v1 models
    assert tokenizer.codebook_size == 12
    torch.testing.assert_close(tokenizer.quantize.codebook, codec["quantize.embedding.weight"])
    x_t = torch.randint(0, 13, (3, 16), generator=g)
    labels, t_code = torch.tensor([0, 4, 5]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        ours = prior.x0_logits(x_t, t_code + 1, None, labels)
        torch.testing.assert_close(ours, ref_transformer(ema, x_t, t_code, 2, (4, 4), labels=labels),
                                   rtol=0, atol=1e-4)
