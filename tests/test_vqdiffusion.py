"""VQ-Diffusion: the Markov chain against brute-force matrices, training-time sampling of t, the samplers
(settings never stick, per-sample streams, fixed budgets), code remapping, the CLIP text conditioner and
CLIP score, caption readers, and class- / caption-conditional generation on the shapes set."""

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import TesseraError
from models.conditioners import CLIPTextEncoder, TextEncoderHandle, build_clip
from models.priors.vqdiffusion import SCHEDULES, MaskReplaceDiffusion, VQDiffusion, categorical_kl, log_onehot
from samplers.rng import streams
from samplers.vqdiffusion import visited_steps
from tests.conftest import run_cli

TINY_TOWER = dict(width=64, heads=4, layers=2)  # the ViT-B/32 text architecture at test width


# ----------------------------------------------------------------------------- the Markov chain


def brute_force_chain(K: int, T: int, schedule: str):
    """Per-step (K+1)x(K+1) transition matrices Q_1..Q_T (rows: from, columns: to; MASK = K), built from
    the linear cumulative schedule independently of the model code."""
    (a1, aT), (g1, gT) = SCHEDULES[schedule]
    frac = torch.arange(T, dtype=torch.float64) / (T - 1)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), a1 + frac * (aT - a1)])
    gbar = torch.cat([torch.zeros(1, dtype=torch.float64), g1 + frac * (gT - g1)])
    Q = [torch.eye(K + 1, dtype=torch.float64)]
    for t in range(1, T + 1):
        alpha = abar[t] / abar[t - 1]
        gamma = 1 - (1 - gbar[t]) / (1 - gbar[t - 1])
        beta = (1 - alpha - gamma) / K
        m = torch.zeros(K + 1, K + 1, dtype=torch.float64)
        m[:K, :K] = beta + alpha * torch.eye(K, dtype=torch.float64)
        m[:K, K] = gamma
        m[K, K] = 1.0
        Q.append(m)
    return Q


def product(Q, s: int, t: int) -> torch.Tensor:
    """Q_{s+1} ... Q_t: the transition from step s to step t."""
    out = torch.eye(Q[0].shape[0], dtype=torch.float64)
    for i in range(s + 1, t + 1):
        out = out @ Q[i]
    return out


@pytest.mark.parametrize("schedule", ["mask", "mask_and_replace"])
def test_q_and_posterior_match_brute_force_markov_chain(schedule):
    K, T = 4, 100
    Q = brute_force_chain(K, T, schedule)
    d = MaskReplaceDiffusion(K, T, schedule)
    assert all(torch.allclose(q.sum(1), torch.ones(K + 1, dtype=torch.float64)) for q in Q)  # stochastic
    # q(x_t | x_0) for every x_0 (one-hot rows) and for a soft x_0
    for t in (1, 2, 50, 99, 100):
        for k in range(K):
            got = d.q_xt(log_onehot(torch.tensor([[k]]), K + 1), torch.tensor([t])).exp()[0, 0]
            torch.testing.assert_close(got, product(Q, 0, t)[k], rtol=0, atol=1e-6)
        soft = torch.softmax(torch.randn(K + 1, dtype=torch.float64), 0)
        got = d.q_xt(soft.log()[None, None], torch.tensor([t])).exp()[0, 0]
        torch.testing.assert_close(got, soft @ product(Q, 0, t), rtol=0, atol=1e-6)
    # posterior sum_k p(k) q(x_s | x_t, x_0 = k), one step and multi-step jumps, every value of x_t
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(K + 1, K, dtype=torch.float64, generator=g), -1)  # p(x_0) per x_t value
    log_p = torch.cat([p.log(), torch.full((K + 1, 1), -math.inf, dtype=torch.float64)], -1)
    x_t = torch.arange(K + 1)
    worst = 0.0
    for t, s in [(1, 0), (2, 1), (37, 36), (100, 99), (100, 60), (37, 0), (5, 2)]:
        got = d.posterior(log_p[None], x_t[None], torch.tensor([t]), torch.tensor([s])).exp()[0]
        cum_s, cum_t, jump = product(Q, 0, s), product(Q, 0, t), product(Q, s, t)
        for j in range(K + 1):
            expected = sum(p[j, k] * cum_s[k] * jump[:, j] / cum_t[k, j] for k in range(K) if cum_t[k, j] > 0)
            worst = max(worst, float((got[j] - expected).abs().max()))
            # the true posterior (one-hot x_0) is a distribution over x_s
            true = d.posterior(log_onehot(torch.tensor([[0]]), K + 1), torch.tensor([[j]]), torch.tensor([t]),
                               torch.tensor([s])).exp()[0, 0]
            if cum_t[0, j] > 0:
                torch.testing.assert_close(true, cum_s[0] * jump[:, j] / cum_t[0, j], rtol=0, atol=1e-6)
    assert worst < 1e-6


def test_schedules_and_forward_sampling():
    K, T = 8, 100
    released = MaskReplaceDiffusion(K, T, "mask")
    kb = K * released.log_bbar[1:].exp()
    torch.testing.assert_close(kb, torch.full_like(kb, 1e-6), rtol=1e-3, atol=0)  # practically pure masking
    paper = MaskReplaceDiffusion(K, T, "mask_and_replace")
    assert float(paper.gbar[T]) == pytest.approx(0.9)
    assert float(K * paper.log_bbar[T].exp()) == pytest.approx(0.1, abs=1e-4)
    with pytest.raises(TesseraError, match="valid per-step"):
        MaskReplaceDiffusion(K, T, {"alpha_bar": [0.9, 0.5], "gamma_bar": [0.5, 0.4]})
    # x_t ~ q(x_t | x_0): keep / specific other code / mask frequencies
    torch.manual_seed(0)
    x0 = torch.zeros(4000, 50, dtype=torch.long)
    t = torch.full((4000,), 70)
    x = paper.sample_xt(x0, t)
    expected = paper.q_xt(log_onehot(x0[:1, :1], K + 1), t[:1]).exp()[0, 0]
    freq = torch.bincount(x.reshape(-1), minlength=K + 1).double() / x.numel()
    torch.testing.assert_close(freq, expected, rtol=0, atol=4e-3)


def test_importance_sampling_of_t_after_warmup():
    torch.manual_seed(0)
    m = VQDiffusion(token_shape=(2, 2), codebook_size=6, dim=16, depth=1, heads=2, num_steps=5)
    t, pt = m._draw_t(1000, "cpu")  # warm-up: uniform
    assert torch.all(pt == 0.2) and set(t.tolist()) == {1, 2, 3, 4, 5}
    m.Lt_count.fill_(11)
    m.Lt_history.copy_(torch.tensor([100.0, 1.0, 4.0, 9.0, 16.0]))
    t, pt = m._draw_t(40000, "cpu")
    w = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0]) + 1e-4  # sqrt(L^2); p(1) := p(2)
    freq = torch.bincount(t - 1, minlength=5).double() / t.numel()
    torch.testing.assert_close(freq, (w / w.sum()).double(), rtol=0, atol=0.01)
    torch.testing.assert_close(pt, (w / w.sum()).double()[t - 1], rtol=1e-6, atol=0)
    # training updates the history (EMA of L_t^2 per step) and the counts
    m.train()
    out = m(torch.randint(0, 6, (8, 2, 2)), {})
    assert torch.isfinite(out["loss"]) and float(m.Lt_count.sum()) == 55 + 8


@pytest.mark.parametrize("schedule", ["mask", "mask_and_replace"])
def test_training_kl_equals_the_kl_of_the_two_posteriors(schedule):
    """kl_and_nll (the few-pass loss) against KL(posterior(one-hot x_0) || posterior(p)) over all K+1 classes."""
    K = 7
    d = MaskReplaceDiffusion(K, 30, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (60, 9), generator=g)
    t = torch.randint(1, 31, (60,), generator=g)
    t[:5] = 1
    torch.manual_seed(0)
    x_t = d.sample_xt(x0, t)
    x_t[:, 0], x_t[:, 1], x_t[:, 2] = x0[:, 0], (x0[:, 1] + 1) % K, K  # kept, replaced, masked
    for s in (t - 1, (t - 1) // 2):
        log_p = torch.log_softmax(4 * torch.randn(60, 9, K, dtype=torch.float64, generator=g), -1)
        kl, log_p_x0 = d.kl_and_nll(log_p, x0, x_t, t, s)
        model = d.posterior(torch.nn.functional.pad(log_p, (0, 1), value=-math.inf), x_t, t, s)
        true = d.posterior(log_onehot(x0, K + 1), x_t, t, s)
        torch.testing.assert_close(kl, categorical_kl(true, model), rtol=0, atol=1e-10)
        torch.testing.assert_close(log_p_x0, model.gather(-1, x0[..., None]).squeeze(-1), rtol=0, atol=1e-10)
        assert float(kl.min()) >= 0
        exact, _ = d.kl_and_nll(log_onehot(x0, K + 1)[..., :K].clamp_min(-200), x0, x_t, t, s)
        assert float(exact.abs().max()) < 1e-9  # a perfect x_0 prediction has zero loss


# ----------------------------------------------------------------------------- samplers


def tiny_prior(condition="class", **kw):
    torch.manual_seed(0)
    params = dict(token_shape=(3, 3), codebook_size=12, dim=32, depth=2, heads=4, num_steps=20)
    if condition == "class":
        params.update(num_classes=3, class_dropout=0.1)
    elif condition == "text":
        params.update(condition="text", text_encoder_allow_random=True, text_tower=TINY_TOWER, text_context=8)
    params.update(kw)
    model = VQDiffusion(**params).eval()
    with torch.no_grad():  # weights far from init, so predictions are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_sampling_settings_do_not_stick_between_calls():
    for condition, cond in (("class", {"class": torch.tensor([0, 1, 2, 0])}),
                            ("text", {"text": ["a red circle", "a blue square", "", "a red circle"]})):
        model = tiny_prior(condition)
        base = model.sample(cond, streams(1, range(4)))
        for settings in ({"truncation_rate": 0.3}, {"cfg": 3.0}, {"num_steps": 5}, {"temperature": 0.5},
                         {"cfg": 2.0, "truncation_rate": 0.6, "num_steps": 4, "sampler": "purity",
                          "purity_weight": 1.0, "reveal_per_call": 2}):
            changed = model.sample(cond, streams(1, range(4)), **settings)
            assert not torch.equal(changed, base), (condition, settings)
            assert torch.equal(model.sample(cond, streams(1, range(4))), base), (condition, settings)
        # guidance with a different batch size afterwards: the null condition is rebuilt per call
        small = {k: v[:2] for k, v in cond.items()}
        a = model.sample(small, streams(1, range(2)), cfg=2.0)
        b = model.sample(cond, streams(1, range(4)), cfg=2.0)
        assert torch.equal(a, b[:2])
        assert not model.training


def test_sample_depends_only_on_its_own_stream():
    model = tiny_prior("class")
    labels = torch.tensor([2, 0, 1, 1, 2])
    for sampling in ({}, {"cfg": 2.0, "num_steps": 6}, {"sampler": "purity", "reveal_per_call": 3}):
        full = model.sample({"class": labels}, streams(3, range(5)), **sampling)
        one = model.sample({"class": labels[3:4]}, streams(3, [3]), **sampling)
        assert torch.equal(full[3:4], one), sampling
        assert full.shape == (5, 3, 3) and int(full.min()) >= 0 and int(full.max()) < 12


def test_fast_and_fixed_budget_samplers():
    assert visited_steps(100, 0) == [(t, t - 1) for t in range(100, 0, -1)]
    fast = visited_steps(100, 25)
    assert len(fast) == 25 and fast[0][0] == 100 and fast[-1][1] == 0 and all(t - s == 4 for t, s in fast)
    model = tiny_prior("none", num_steps=20)
    assert torch.equal(model.sample({}, streams(0, range(3)), num_steps=20), model.sample({}, streams(0, range(3))))
    # fixed budget: revealed positions grow by the schedule's quota and never change afterwards
    for sampler in ("fixed_budget", "purity"):
        tokens, states = model.sample({}, streams(0, range(3)), trace=True, sampler=sampler, num_steps=5,
                                      reveal_per_call=1, purity_weight=2.0)
        counts = [int((st[0] >= 0).sum()) for st in states]
        g = model.diffusion.gbar
        assert counts == [0] + [round(9 * float((g[20] - g[s]) / g[20])) for s in (16, 12, 8, 4)] + [9]
        assert counts == [0, 2, 4, 6, 8, 9]
        for a, b in zip(states, states[1:]):
            kept = a >= 0
            assert torch.equal(a[kept], b[kept])
        assert torch.equal(states[-1], tokens)
    with pytest.raises(TesseraError, match="truncation_rate"):
        model.sample({}, streams(0, range(1)), truncation_rate=0.0)
    with pytest.raises(TesseraError, match="sampler"):
        model.sample({}, streams(0, range(1)), sampler="greedy")
    with pytest.raises(TesseraError, match="cfg"):
        model.sample({}, streams(0, range(1)), cfg=2.0)


def test_truncation_keeps_the_top_mass_of_x0():
    model = tiny_prior("class")
    seen = []

    def spy(x_t, t):
        out = predict(x_t, t)
        seen.append(out)
        return out

    s = model._check_sampling(dict(temperature=1.0, top_k=0, top_p=1.0, cfg=1.0, truncation_rate=0.5, num_steps=0,
                                   sampler="posterior", reveal_per_call=0, purity_weight=0.0))
    predict = model._predictor(s, None, torch.tensor([0, 1]), None, None)
    x_t = torch.full((2, 9), 12)
    log_p = spy(x_t, 20)[..., :12].exp()
    full = torch.softmax(model.x0_logits(x_t, torch.full((2,), 20), None, torch.tensor([0, 1])).double(), -1)
    for row_kept, row_full in zip(log_p.reshape(-1, 12), full.reshape(-1, 12)):
        kept = row_kept > 0
        order = row_full.argsort(descending=True)
        mass_before = torch.cumsum(row_full[order], 0) - row_full[order]
        assert torch.equal(kept[order], mass_before < 0.5)


# ----------------------------------------------------------------------------- remapping


def test_code_remap_models_only_used_codes(tmp_path):
    from data.cache import write_codes_used

    cache = tmp_path / "cache"
    cache.mkdir()
    tokens = np.array([[[[3, 7], [7, 9]], [[9, 3], [7, 7]]]] * 5, dtype=np.int32)  # [N, 2, 2, 2]
    np.save(cache / "tokens.npy", tokens)
    (cache / "meta.json").write_text(json.dumps({"num_items": 5, "token_shape": [2, 2]}))
    path, count = write_codes_used(cache, tmp_path / "codes_used.npy")
    assert count == 3 and np.load(path).tolist() == [3, 7, 9]

    class Codebook:  # a tokenizer stand-in: code i sits at position i on a line
        def embed(self, ids):
            return ids.float()[:, None]

    torch.manual_seed(0)
    m = VQDiffusion(token_shape=(2, 2), codebook_size=16, dim=16, depth=1, heads=2, num_steps=10,
                    remap=str(path), tokenizer=Codebook())
    assert m.codebook_size == 3 and m.to_logits[1].out_features == 3
    assert m.full_to_code.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]  # nearest used code
    out = m(torch.tensor([[[3, 9], [7, 7]]]), {})
    assert torch.isfinite(out["loss"])
    sample = m.sample({}, streams(0, range(6)))
    assert set(sample.unique().tolist()) <= {3, 7, 9}
    with pytest.raises(TesseraError, match="remap"):
        VQDiffusion(token_shape=(2, 2), codebook_size=16, dim=16, depth=1, heads=2, remap=str(tmp_path / "none.npy"))


# ----------------------------------------------------------------------------- CLIP text, CLIP score


def test_clip_text_encoder_random_weights_context_and_loading(tmp_path):
    from safetensors.torch import save_file

    captions = ["a small red circle in the top left", "a large blue triangle at the bottom", ""]
    full = CLIPTextEncoder(allow_random=True, tower=TINY_TOWER, context=77)
    short = CLIPTextEncoder(allow_random=True, tower=TINY_TOWER, context=12)
    f77, f12 = full(captions), short(captions)
    assert f77.shape == (3, 77, 64) and f12.shape == (3, 12, 64)
    torch.testing.assert_close(f77[:, :12], f12, rtol=0, atol=1e-5)  # causal: a shorter context is exact
    torch.testing.assert_close(f77.norm(dim=-1), torch.ones(3, 77), rtol=0, atol=1e-5)
    assert float((f77[0] - f77[1]).abs().max()) > 1e-2  # random weights still separate captions
    # a whole-model state dict under a prefix (as inside a VQ-Diffusion checkpoint) loads strictly
    state = {f"transformer.condition_emb.{k}": v.half() for k, v in full.tower.state_dict().items()}
    state["transformer.condition_emb.visual.proj"] = torch.zeros(3)
    save_file(state, str(tmp_path / "clip.safetensors"))
    loaded = CLIPTextEncoder(weights=str(tmp_path / "clip.safetensors"), tower=TINY_TOWER, seed=5)
    torch.testing.assert_close(loaded(captions), full(captions), rtol=0, atol=5e-3)
    with pytest.raises(TesseraError, match="text_encoder_weights"):
        CLIPTextEncoder(tower=TINY_TOWER)
    with pytest.raises(TesseraError, match="not found"):
        CLIPTextEncoder(weights=str(tmp_path / "missing.pt"), tower=TINY_TOWER)
    handle = TextEncoderHandle(short, cache_size=2)
    torch.testing.assert_close(handle.encode(captions, "cpu"), f12)
    assert len(handle.cache) == 2


def test_clip_score_converts_images_from_minus_one_one():
    from metrics.clip_score import clip_score, to_unit_range

    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    signed = u8.permute(0, 3, 1, 2).float() / 127.5 - 1  # tessera's [-1, 1] floats
    torch.testing.assert_close(to_unit_range(signed), to_unit_range(u8.numpy()), rtol=0, atol=1e-6)
    torch.testing.assert_close(to_unit_range(u8.permute(0, 3, 1, 2)), u8.permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(TesseraError, match="--clip-weights"):
        build_clip()
    from open_clip.model import CLIP

    model = CLIP(32, vision_cfg={"image_size": 224, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}).eval()
    captions = ["a red circle", "a blue square"]
    both = torch.cat([signed, signed.clamp(0, 1) * 2 - 1])  # the second pair: [-1, 1] misread as [0, 1]
    scores = clip_score(model, both, captions * 2)
    a = clip_score(model, u8.numpy(), captions)
    cos = torch.tensor(scores["per_pair"])
    torch.testing.assert_close(cos[:2], torch.tensor(a["per_pair"]), rtol=0, atol=1e-4)
    assert float((cos[:2] - cos[2:]).abs().max()) > 1e-4
    assert a["clip_score"] == pytest.approx(100 * float(cos[:2].clamp_min(0).mean()), abs=1e-3)


# ----------------------------------------------------------------------------- caption data


def test_caption_readers_and_flip_pairs(tmp_path):
    from PIL import Image

    from data.captions import (
        CaptionDataset,
        CaptionTrainingSet,
        cache_rows,
        read_coco_captions,
        read_cub_captions,
        read_tsv_captions,
    )

    (tmp_path / "img" / "001.Bird").mkdir(parents=True)
    for name in ("001.Bird/a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / name)
    coco = {"images": [{"id": 1, "file_name": "b.jpg"}, {"id": 2, "file_name": "001.Bird/a.jpg"}],
            "annotations": [{"id": 5, "image_id": 1, "caption": "A dog  on the left."},
                            {"id": 3, "image_id": 2, "caption": "a bird"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert read_coco_captions(tmp_path / "captions.json") == [
        {"file": "001.Bird/a.jpg", "caption": "a bird"}, {"file": "b.jpg", "caption": "A dog on the left."}]
    (tmp_path / "text" / "001.Bird").mkdir(parents=True)
    (tmp_path / "text" / "001.Bird" / "a.txt").write_text("this bird is red\n\nit has a short beak\n")
    assert [r["caption"] for r in read_cub_captions(tmp_path / "text")] == ["this bird is red", "it has a short beak"]
    (tmp_path / "cc.tsv").write_text("caption\tfile\na dog on the left\tb.jpg\na bird\t001.Bird/a.jpg\n")
    assert read_tsv_captions(tmp_path / "cc.tsv")[0] == {"file": "b.jpg", "caption": "a dog on the left"}

    captions = CaptionDataset(tmp_path / "img", tmp_path / "cc.tsv", 8, format="tsv")
    files = sorted((tmp_path / "img").rglob("*.jpg"))
    rows = cache_rows(captions.records, files, tmp_path / "img")
    assert rows == [1, 0]
    tokens = [(torch.tensor([[10 * i]] * 2) + torch.tensor([[0], [1]]), 0) for i in range(2)]  # [2 variants]
    pairs = CaptionTrainingSet(captions, flips=True, tokens=tokens, image_index=rows)
    assert len(pairs) == 4
    assert (pairs[0][0].item(), pairs[0][1]) == (10, "a dog on the left")
    assert (pairs[1][0].item(), pairs[1][1]) == (11, "a dog on the right")  # mirrored tokens, mirrored words
    image, caption = CaptionTrainingSet(captions, flips=True)[3]
    assert image.shape == (3, 8, 8) and caption == "a bird"


# ----------------------------------------------------------------------------- shapes generation


def shapes_accuracy(npz_path, labels) -> float:
    from metrics.shapes import shapes_metrics

    images = np.load(npz_path)["arr_0"]
    return shapes_metrics(images, np.asarray(labels))["accuracy"]


@pytest.mark.slow
def test_class_conditional_shapes(shapes_vq, tmp_path):
    run = tmp_path / "vqd"
    run_cli("main_prior.py", "--config", "configs/shapes/prior/vqdiffusion.yaml", "--tokenizer", shapes_vq,
            "--run-dir", run, f"train.cache={shapes_vq}/cache/train", "train.max_steps=300")  # the test budget
    out = tmp_path / "samples"
    run_cli("main_sample.py", "--prior", run, "--num-samples", 48, "--batch-size", 48, "--out", out)
    accuracy = shapes_accuracy(out.with_suffix(".npz"), [i % 8 for i in range(48)])
    print(f"class-conditional shapes accuracy {accuracy:.3f}")
    assert accuracy >= 0.9


@pytest.mark.slow
def test_caption_conditional_shapes(shapes_vq, tmp_path):
    from data import build_caption_dataset
    from data.shapes import CLASSES

    run = tmp_path / "vqd_text"
    run_cli("main_prior.py", "--config", "configs/shapes/prior/vqdiffusion_caption.yaml", "--tokenizer", shapes_vq,
            "--run-dir", run, f"train.cache={shapes_vq}/cache/train", "train.max_steps=400")  # the test budget
    records = build_caption_dataset({"name": "shapes"}, "val").records[::25][:40]  # 5 per class
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(r["caption"] + "\n" for r in records))
    out = tmp_path / "samples"
    run_cli("main_sample.py", "--prior", run, "--num-samples", len(records), "--batch-size", 40, "--out", out,
            "--captions", captions)
    labels = [next(i for i, name in enumerate(CLASSES) if f" {name} " in r["caption"]) for r in records]
    accuracy = shapes_accuracy(out.with_suffix(".npz"), labels)
    print(f"caption-conditional shapes match {accuracy:.3f}")
    assert accuracy >= 0.8


@pytest.mark.parametrize("config,params_m", [("configs/coco/prior/vqdiffusion.yaml", 388.8),
                                             ("configs/imagenet256/prior/vqdiffusion.yaml", 518.0),
                                             ("configs/ffhq256/prior/vqdiffusion.yaml", 411.2)])
def test_released_configs_have_the_released_sizes(config, params_m):
    """Built on the meta device (no memory): the parameter counts of the released transformers."""
    from omegaconf import OmegaConf

    model = dict(OmegaConf.to_container(OmegaConf.load(config).model))
    model.pop("target")
    codes = {"text": 2887, "class": 974, "none": 1024}[model["condition"]]
    model.update(remap=None, text_encoder_weights=None, text_encoder_allow_random=True, text_encoder_seed=91)
    with torch.device("meta"):
        prior = VQDiffusion(token_shape=(32, 32) if codes == 2887 else (16, 16), codebook_size=codes,
                            num_classes=1000, **model)
    count = sum(p.numel() for name, p in prior.named_parameters() if name != "empty_text_embed")
    assert round(count / 1e6, 1) == params_m
