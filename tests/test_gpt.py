"""GPT prior and the shared layers: rotary, causal mask, KV cache, per-sample streams, CFG, learning."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from engine.errors import TesseraError
from models.layers import (
    AdaLNZero,
    Attention,
    Block,
    CrossAttention,
    KVCache,
    RMSNorm,
    apply_rotary,
    modulate,
    rope_1d,
    rope_2d,
    rope_2d_grid,
    rotary_cos_sin,
)
from models.priors.gpt import GPT
from samplers.rng import streams
from samplers.trace import BLANK_GREY, decode_frames, decoding_gif

ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt(pos="learned", num_classes=3, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    params = dict(dim=32, depth=2, heads=4, pos=pos, **kw)
    model = GPT(token_shape=(4, 4), codebook_size=16, num_classes=num_classes, **params).to(dtype).eval()
    with torch.no_grad():  # random weights well away from init, so logits are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


# ----------------------------------------------------------------------------- rotary


def test_rotary_1d_depends_only_on_offset():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # [1, 1, 1, 16] each

    def score(tq, tk):
        rq = apply_rotary(q, rotary_cos_sin(rope_1d(16, torch.tensor([tq]))))
        rk = apply_rotary(k, rotary_cos_sin(rope_1d(16, torch.tensor([tk]))))
        return (rq * rk).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(score(7, 7), abs=1e-5)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_rotary_2d_depends_only_on_row_and_column_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)

    def score(rq, cq, rk, ck):
        aq = rope_2d(16, torch.tensor([rq]), torch.tensor([cq]))
        ak = rope_2d(16, torch.tensor([rk]), torch.tensor([ck]))
        cs = lambda a: rotary_cos_sin(a, torch.float64)  # noqa: E731
        return (apply_rotary(q, cs(aq)) * apply_rotary(k, cs(ak))).sum().item()

    assert score(3, 1, 1, 0) == pytest.approx(score(7, 5, 5, 4), abs=1e-9)
    assert abs(score(3, 1, 1, 0) - score(3, 1, 0, 1)) > 1e-3  # same 1-D raster offset, different 2-D offset
    assert abs(score(3, 1, 1, 0) - score(3, 2, 1, 0)) > 1e-3
    # row and column use separate halves of the channels
    grid = rope_2d_grid(16, 4, 4)
    assert torch.equal(grid[5, :4], grid[6, :4])  # same row 1 -> same row angles
    assert torch.equal(grid[5, 4:], grid[9, 4:])  # same column 1 -> same column angles


def test_rotary_reaches_every_head():
    """A constant input becomes position-dependent in every head."""
    H, T, D = 4, 6, 16
    x = torch.randn(1, H, 1, D).expand(1, H, T, D)
    out = apply_rotary(x, rotary_cos_sin(rope_1d(D, torch.arange(T))))
    for h in range(H):
        assert (out[0, h, 1:] - out[0, h, :1]).abs().amax(-1).min() > 1e-3
    # the GPT's rope2d table (shared by all heads) rotates every channel pair and leaves the prefix alone
    model = tiny_gpt("rope2d", num_cond_tokens=2)
    assert torch.equal(model.rope_cos[:2], torch.ones_like(model.rope_cos[:2]))
    assert (model.rope_sin[2:].abs().amax(0) > 0).all()  # every pair is rotated somewhere on the grid


# ----------------------------------------------------------------------------- attention and cache


def test_causal_logits_ignore_later_tokens():
    for pos in ("learned", "rope2d"):
        model = tiny_gpt(pos)
        torch.manual_seed(1)
        codes = torch.randint(0, 16, (2, 16))
        ids = torch.tensor([0, 2])
        base = model.logits(codes, ids)
        for t in (0, 5, 13):
            changed = codes.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 16
            out = model.logits(changed, ids)
            # logits[:, j] predicts code j from codes < j: positions <= t + 1 see only unchanged codes
            torch.testing.assert_close(out[:, : t + 2], base[:, : t + 2], rtol=0, atol=1e-6)
            assert (out[:, t + 2 :] - base[:, t + 2 :]).abs().max() > 1e-4


def test_kv_cache_chunks_match_full_causal_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(3, 9, 32)
    rope = rotary_cos_sin(rope_1d(8, torch.arange(9)))
    full = attn(x, causal=True, rope=rope)
    cache, outs, start = KVCache(9), [], 0
    for n in (3, 1, 4, 1):  # prefill, single steps and a multi-token chunk after a prefix
        r = (rope[0][start : start + n], rope[1][start : start + n])
        outs.append(attn(x[:, start : start + n], causal=True, rope=r, cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    with pytest.raises(TesseraError, match="overflow"):
        attn(x[:, :1], causal=True, cache=cache)


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
def test_kv_cache_sampling_equals_uncached(pos):
    # float32: the cached next-token logits match teacher forcing within 1e-5
    model = tiny_gpt(pos)
    codes = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([0, 1, 2, 3])
    full = model.logits(codes, ids)
    caches = model.new_kv_caches()
    for t in range(16):
        step = model.next_logits(ids, codes[:, :t], caches)
        torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-5)
    # float64: the same streams give exactly the same tokens with and without the cache
    model = tiny_gpt(pos, dtype=torch.float64)
    cond = {"class": torch.tensor([0, 1, 2, 0])}
    for sampling in ({}, {"cfg": 3.0}, {"cfg": 2.0, "cfg_schedule": "linear", "top_k": 5, "top_p": 0.8}):
        a = model.sample(cond, streams(7, range(4)), **sampling)
        b = model.sample(cond, streams(7, range(4)), use_kv_cache=False, **sampling)
        assert torch.equal(a, b), sampling
        assert a.shape == (4, 4, 4) and a.dtype == torch.long


def test_sample_does_not_depend_on_batch():
    model = tiny_gpt("rope2d")
    labels = torch.tensor([2, 0, 1, 2])
    for sampling in ({}, {"cfg": 2.5, "top_p": 0.9}):
        batch = model.sample({"class": labels}, streams(11, range(4)), **sampling)
        for b in range(4):
            alone = model.sample({"class": labels[b : b + 1]}, streams(11, [b]), **sampling)
            assert torch.equal(alone[0], batch[b])
    other = model.sample({"class": labels}, streams(12, range(4)))
    assert not torch.equal(other, batch)


def test_top_k_one_is_greedy():
    model = tiny_gpt()
    tokens = model.sample({"class": torch.tensor([1, 2])}, streams(0, range(2)), top_k=1)
    codes = tokens.view(2, -1)
    greedy = model.logits(codes, torch.tensor([1, 2])).argmax(-1)
    assert torch.equal(codes, greedy)


def test_shared_layers_adaln_cross_attention_norms():
    torch.manual_seed(0)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 16)
    block = AdaLNZero(32, 16, heads=4)
    torch.testing.assert_close(block(x, c), x)  # zero-initialised gates: identity at init
    shift, scale = torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    # padded context entries do not reach the output
    cross = CrossAttention(32, 24, heads=4).eval()
    ctx = torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    changed = ctx.clone()
    changed[0, 4:] += 5.0
    torch.testing.assert_close(cross(x, changed, mask)[0], cross(x, ctx, mask)[0])
    assert (cross(x, changed)[0] - cross(x, ctx)[0]).abs().max() > 1e-3
    # a bidirectional block lets early positions see later ones; a cross-attention block needs its context
    blk = Block(32, 4, context_dim=24).eval()
    later = x.clone()
    later[:, -1] += torch.randn(32)  # (a constant shift would vanish in the LayerNorm)
    assert (blk(later, context=ctx)[:, 0] - blk(x, context=ctx)[:, 0]).abs().max() > 1e-4
    with pytest.raises(TesseraError, match="context"):
        blk(x)
    norm = RMSNorm(32)
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_grad_checkpointing_gives_the_same_gradients():
    tokens, cond = torch.randint(0, 16, (2, 4, 4)), {"class": torch.tensor([0, 1])}
    grads = []
    for ckpt in (False, True):
        model = tiny_gpt("rope2d", class_dropout=0.0, norm="rmsnorm", mlp="swiglu")
        model.set_grad_checkpointing(ckpt)
        model.train()
        model(tokens, cond)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- conditioning


def test_label_dropout_uses_the_null_class():
    model = tiny_gpt(class_dropout=0.5)
    labels = torch.arange(3).repeat(200)
    model.train()
    torch.manual_seed(0)
    ids = model.class_ids({"class": labels}, labels.shape[0], "cpu")
    dropped = ids != labels
    assert (ids[dropped] == model.num_classes).all()  # the null row, never another class or a code
    assert 0.4 < dropped.float().mean() < 0.6
    model.eval()
    assert torch.equal(model.class_ids({"class": labels}, labels.shape[0], "cpu"), labels)
    # with every label dropped, the training loss no longer depends on the label, and the null row learns
    model.class_dropout = 0.999999
    model.train()
    tokens = torch.randint(0, 16, (2, 4, 4))
    loss_a = model(tokens, {"class": torch.tensor([0, 0])})["loss"]
    loss_b = model(tokens, {"class": torch.tensor([1, 2])})["loss"]
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    grad = model.cond_emb.weight.grad
    assert grad[model.num_classes].abs().sum() > 0 and grad[:3].abs().sum() == 0


def test_class_and_code_tables_are_separate():
    model = tiny_gpt(num_classes=5)
    assert model.cond_emb.num_embeddings == 6 and model.tok_emb.num_embeddings == 16
    assert model.head.out_features == 16  # the loss and the sampler only ever see the K codes
    unconditional = tiny_gpt(num_classes=0)
    assert unconditional.cond_emb.num_embeddings == 1  # the learned start token
    out = unconditional(torch.randint(0, 16, (2, 4, 4)), {})
    assert set(out) == {"loss", "nll", "acc"}
    with pytest.raises(TesseraError, match="unconditional"):
        unconditional(torch.randint(0, 16, (2, 4, 4)), {"class": torch.tensor([0, 1])})
    with pytest.raises(TesseraError, match="cfg"):
        unconditional.sample({}, streams(0, [0]), cfg=2.0)


def test_bad_inputs_raise_clear_errors():
    model = tiny_gpt()
    with pytest.raises(TesseraError, match="unknown sampling option 'temp'"):
        model.sample({"class": torch.tensor([0])}, streams(0, [0]), temp=0.5)
    with pytest.raises(TesseraError, match=r"tokens \[B, 4, 4\]"):
        model(torch.zeros(2, 5, 4, dtype=torch.long), {"class": torch.tensor([0, 1])})
    with pytest.raises(TesseraError, match="code ids"):
        model(torch.full((2, 4, 4), 16), {"class": torch.tensor([0, 1])})
    with pytest.raises(TesseraError, match="class labels"):
        model(torch.zeros(2, 4, 4, dtype=torch.long), {"class": torch.tensor([0, 3])})
    with pytest.raises(TesseraError, match="depth"):
        GPT(token_shape=(4, 4, 4), codebook_size=16, dim=32, depth=1, heads=4)
    rq1 = GPT(token_shape=(4, 4, 1), codebook_size=16, dim=32, depth=1, heads=4)
    assert rq1.sample({}, streams(0, [0, 1])).shape == (2, 4, 4, 1)


def test_optimizer_groups_decay_linear_weights_only():
    model = tiny_gpt(tie_embeddings=False)
    decay, no_decay = model.configure_optimizer_groups(0.05)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert id(model.tok_emb.weight) in {id(p) for p in no_decay["params"]}
    tied = tiny_gpt(tie_embeddings=True)
    assert tied.head.weight is tied.tok_emb.weight
    assert id(tied.tok_emb.weight) not in {id(p) for p in tied.configure_optimizer_groups(0.1)[0]["params"]}


# ----------------------------------------------------------------------------- trace and GIF


def test_trace_states_fill_monotonically_and_gif(tmp_path):
    model = tiny_gpt()
    cond = {"class": torch.tensor([0, 1, 2])}
    tokens, states = model.sample(cond, streams(0, range(3)), trace=True, cfg=2.0)
    assert len(states) == 5 and (states[0] == -1).all() and torch.equal(states[-1], tokens)
    for i, (prev, cur) in enumerate(zip(states, states[1:])):
        filled_prev, filled_cur = prev >= 0, cur >= 0
        assert (filled_cur >= filled_prev).all()  # nothing is un-generated
        assert torch.equal(cur[filled_prev], prev[filled_prev])  # nothing generated changes
        assert torch.equal(cur[filled_cur], tokens[filled_cur])
        assert filled_cur[:, : i + 1].all() and not filled_cur[:, i + 1 :].any()  # one raster row per state

    def decode(t):  # code c -> a flat 2x2 patch of grey level c / 15 in [-1, 1]
        img = (t.float() / 15 * 2 - 1)[:, None].repeat(1, 3, 1, 1)
        return torch.nn.functional.interpolate(img, scale_factor=2, mode="nearest")

    frames = decode_frames(states[:3], decode, grid=True)  # 3 samples -> a 2 x 2 grid with 2-px gutters
    assert frames[0].shape == (8 + 2 + 8, 8 + 2 + 8, 3)
    blank = round(BLANK_GREY * 255)
    assert (frames[0][:8, :8] == blank).all()
    second = frames[2][:8, :8, 0]  # sample 0 after two rows
    expected_rows = (tokens[0, :2].float() / 15 * 255).round().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(torch.from_numpy(second[:4].astype("float32")), expected_rows)
    assert (second[4:] == blank).all()
    path = decoding_gif(states, decode, tmp_path / "gif" / "decode.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.n_frames == len(states)
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert durations[-1] > durations[0] == 100


# ----------------------------------------------------------------------------- learning


def test_learns_class_patterns_and_samples_them_with_cfg():
    """Class c -> a fixed 4x4 code pattern with 10% of cells noised; CFG samples must follow the class."""
    K, C = 16, 4
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, K, (C, 4, 4), generator=g)

    def batch(n):
        labels = torch.randint(0, C, (n,), generator=g)
        tokens = patterns[labels].clone()
        noise = torch.rand(n, 4, 4, generator=g) < 0.1
        tokens[noise] = torch.randint(0, K, (int(noise.sum()),), generator=g)
        return tokens, labels

    torch.manual_seed(0)
    model = GPT(token_shape=(4, 4), codebook_size=K, num_classes=C, dim=64, depth=2, heads=4, pos="rope2d")
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.01), lr=5e-3, betas=(0.9, 0.95))
    model.train()
    for _ in range(250):
        tokens, labels = batch(64)
        loss = model(tokens, {"class": labels})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * math.log(K)
    model.eval()
    labels = torch.arange(C).repeat(16)
    samples = model.sample({"class": labels}, streams(0, range(len(labels))), cfg=3.0)
    match = (samples == patterns[labels]).float().flatten(1).mean(1)  # per-sample fraction of pattern cells
    nearest = (samples[:, None] == patterns[None]).flatten(2).sum(-1).argmax(1)
    assert (nearest == labels).float().mean() >= 0.9  # the sample's closest pattern is its class's
    assert match.mean() >= 0.75  # the data itself matches at ~0.91 (10% noise)
    unguided = model.sample({"class": labels}, streams(0, range(len(labels))))
    assert not torch.equal(unguided, samples)  # guidance changes the draws


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "path, params_m",
    [
        ("configs/imagenet256/prior/gpt_b.yaml", 111),
        ("configs/imagenet256/prior/gpt_l.yaml", 343),
        ("configs/imagenet256/prior/gpt_xl.yaml", 775),
    ],
)
def test_imagenet_configs_have_the_published_sizes(path, params_m):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / path), resolve=True)
    params = cfg["model"]
    assert params.pop("target") == "gpt"
    with torch.device("meta"):
        model = GPT(token_shape=(16, 16), codebook_size=16384, num_classes=1000, **params)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.02, n


@pytest.mark.parametrize("path", ["configs/shapes/prior/gpt.yaml", "configs/stanford-dogs/prior/gpt.yaml"])
def test_small_configs_build(path):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / path), resolve=True)
    params = cfg["model"]
    assert params.pop("target") == "gpt"
    assert set(cfg) == {"model", "train", "sampling"}
    with torch.device("meta"):
        GPT(token_shape=(8, 8), codebook_size=4096, num_classes=120, **params)
