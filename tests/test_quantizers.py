"""VectorQuantizer: cross-check with vector-quantize-pytorch, loss conventions, cosine / factorised codes,
rotation trick, usage penalty, restarts, warm start, initialisation, and 1-vs-2-process equality."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.errors import TesseraError
from models.tokenizers.quantizers import VectorQuantizer

ROOT = Path(__file__).resolve().parents[1]


def _set_codebook(vq: VectorQuantizer, codes: torch.Tensor) -> None:
    with torch.no_grad():
        vq.embedding.weight.copy_(codes)
        if vq.codebook_update == "ema":
            vq.embed_sum.copy_(codes)
            vq.cluster_size.fill_(1.0)


def _tokens(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B*h*w, C] in the quantizer's row order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# ---- 1. cross-check with vector-quantize-pytorch -------------------------------------------------


def test_ema_step_ids_and_ste_match_vector_quantize_pytorch():
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    K, D, decay, eps, beta = 16, 4, 0.9, 1e-5, 0.25
    codes = torch.randn(K, D)
    # Its EMA: cluster_size starts at ones and embed_avg at the codes, both lerp'ed by (1 - decay);
    # codes = embed_avg / laplace-smoothed cluster_size, the conventions VectorQuantizer documents.
    ref = VectorQuantize(dim=D, codebook_size=K, decay=decay, eps=eps, kmeans_init=False,
                         learnable_codebook=False, ema_update=True, threshold_ema_dead_code=0,
                         rotation_trick=False, straight_through=False, commitment_weight=beta,
                         accept_image_fmap=True, sync_codebook=False)
    with torch.no_grad():
        ref._codebook.embed.copy_(codes[None])
        ref._codebook.embed_avg.copy_(codes[None])
    mine = VectorQuantizer(K, D, beta=beta, codebook_update="ema", ema_decay=decay, ema_eps=eps)
    _set_codebook(mine, codes)
    ref.train()
    mine.train()

    for step in range(2):  # the second step checks that the EMA statistics carried over
        z = torch.randn(2, D, 3, 5)
        z_ref, z_mine = z.clone().requires_grad_(), z.clone().requires_grad_()
        out_ref, ids_ref, loss_ref = ref(z_ref)
        out = mine(z_mine)
        assert torch.equal(out.ids, ids_ref)
        torch.testing.assert_close(out.z_q, out_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.loss, loss_ref, rtol=1e-6, atol=1e-7)
        w = torch.randn_like(out_ref)
        ((out_ref * w).sum() + loss_ref).backward()
        ((out.z_q * w).sum() + out.loss).backward()
        torch.testing.assert_close(z_mine.grad, z_ref.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.codebook, ref.codebook, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine.cluster_size, ref._codebook.cluster_size[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine.embed_sum, ref._codebook.embed_avg[0], rtol=1e-6, atol=1e-6)
        assert step > 0 or not torch.allclose(mine.codebook, codes)  # the step really moved codes

    ref.eval()
    z = torch.randn(3, D, 4, 4)
    _, ids_ref, _ = ref(z)
    assert torch.equal(mine.quantize(_tokens(z)), ids_ref.reshape(-1))


# ---- 2. loss conventions, cosine, factorised codes, rotation trick -------------------------------


def _one_token_case(**kw):
    vq = VectorQuantizer(2, 2, beta=0.25, **kw)
    _set_codebook(vq, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([0.8, 0.6]).reshape(1, 2, 1, 1).requires_grad_()
    out = vq(z)
    out.loss.backward()
    return vq, z, out


def test_standard_and_legacy_beta_on_a_hand_computed_example():
    # z = (0.8, 0.6) is nearest to code 1 = (1, 1); z - q = (-0.2, -0.4); mean square = 0.1.
    vq, z, out = _one_token_case()
    assert out.ids.item() == 1
    assert out.logs["commit"].item() == pytest.approx(0.1)
    assert out.logs["codebook"].item() == pytest.approx(0.1)
    assert out.loss.item() == pytest.approx(0.1 + 0.25 * 0.1)
    # standard: encoder gradient beta * 2(z - q)/2, codebook gradient 1 * 2(q - z)/2
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([-0.05, -0.1]))
    torch.testing.assert_close(vq.codebook.grad, torch.tensor([[0.0, 0.0], [0.2, 0.4]]))

    vq, z, out = _one_token_case(legacy_beta=True)  # commit + beta * codebook
    assert out.loss.item() == pytest.approx(0.1 + 0.25 * 0.1)
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([-0.2, -0.4]))
    torch.testing.assert_close(vq.codebook.grad, torch.tensor([[0.0, 0.0], [0.05, 0.1]]))

    vq, z, out = _one_token_case(codebook_update="ema")  # beta * commit only
    assert out.loss.item() == pytest.approx(0.025) and out.logs["codebook"].item() == 0.0

    # two tokens, beta 0.5: squared errors (0.01 + 0.09) for each, mean over 4 entries
    vq = VectorQuantizer(2, 2, beta=0.5)
    _set_codebook(vq, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[0.1, 0.3], [0.9, 1.3]]).t().reshape(1, 2, 1, 2)
    out = vq(z)
    expected = ((0.01 + 0.09) + (0.01 + 0.09)) / 4
    assert out.loss.item() == pytest.approx(expected * 1.5)


def test_cosine_mode_normalises_search_codes_and_losses():
    torch.manual_seed(1)
    K, D = 6, 3
    codes = torch.randn(K, D) * torch.tensor([0.1, 1, 10, 2, 0.5, 5])[:, None]
    vq = VectorQuantizer(K, D, cosine=True)
    _set_codebook(vq, codes)
    z = torch.randn(2, D, 4, 4) * 3
    vq.eval()
    out = vq(z)
    e = F.normalize(_tokens(z), dim=-1)
    c = F.normalize(codes, dim=-1)
    ids = (e @ c.t()).argmax(1)
    assert torch.equal(out.ids.reshape(-1), ids)
    torch.testing.assert_close(_tokens(out.z_q), c[ids])  # the decoder sees unit-norm codes
    torch.testing.assert_close(_tokens(out.z_q).norm(dim=-1), torch.ones(32))
    torch.testing.assert_close(out.logs["commit"], F.mse_loss(e, c[ids]))
    torch.testing.assert_close(vq.lookup(out.ids), out.z_q.permute(0, 2, 3, 1))


def test_factorised_codes_shapes_and_gradient_flow():
    torch.manual_seed(2)
    vq = VectorQuantizer(8, 2, input_dim=6, codebook_update="grad")
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = vq(z)
    assert out.z_q.shape == (2, 6, 3, 3) and out.ids.shape == (2, 3, 3)
    (out.z_q.pow(2).sum() + out.loss).backward()
    for name, t in [("z", z), ("in_proj", vq.in_proj.weight), ("out_proj", vq.out_proj.weight),
                    ("codebook", vq.codebook)]:
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    vq.eval()
    out = vq(z)
    assert torch.equal(vq.quantize(_tokens(z)), out.ids.reshape(-1))
    torch.testing.assert_close(vq.lookup(out.ids), out.z_q.permute(0, 2, 3, 1))
    assert vq.lookup(out.ids).shape == (2, 3, 3, 6)
    expected = {"embedding.weight", "initialized", "pretrain_steps_done", "num_updates", "steps_since_used",
                "in_proj.weight", "out_proj.weight"}
    assert set(vq.state_dict()) == expected
    ema = VectorQuantizer(8, 2, codebook_update="ema")
    expected = (expected - {"in_proj.weight", "out_proj.weight"}) | {"cluster_size", "embed_sum"}
    assert set(ema.state_dict()) == expected


def test_rotation_trick_forward_equals_code_and_rotates_the_gradient():
    torch.manual_seed(3)
    K, D = 10, 4
    codes = torch.randn(K, D)
    z = torch.randn(2, D, 2, 3)
    g = torch.randn(2, D, 2, 3)
    outs = {}
    for mode in ("ste", "rotation"):
        vq = VectorQuantizer(K, D, gradient=mode)
        _set_codebook(vq, codes)
        zz = z.clone().requires_grad_()
        out = vq(zz)
        (out.z_q * g).sum().backward()
        outs[mode] = (out, zz.grad)
    ste, rot = outs["ste"], outs["rotation"]
    assert torch.equal(rot[0].z_q, ste[0].z_q)
    torch.testing.assert_close(_tokens(rot[0].z_q), codes[rot[0].ids.reshape(-1)], rtol=0, atol=0)
    torch.testing.assert_close(ste[1], g)  # straight-through copies the gradient
    assert torch.isfinite(rot[1]).all() and not torch.allclose(rot[1], ste[1], atol=1e-3)
    # reference: grad_e = (|q|/|e|) R^T g with R = I - 2 w w^T + 2 v u^T
    e, q, gt = _tokens(z), codes[rot[0].ids.reshape(-1)], _tokens(g)
    for i in range(e.shape[0]):
        u, v = F.normalize(e[i], dim=0), F.normalize(q[i], dim=0)
        w = F.normalize(u + v, dim=0)
        R = torch.eye(D) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(R @ u, v, atol=1e-5, rtol=0)
        expected = q[i].norm() / e[i].norm() * R.t() @ gt[i]
        torch.testing.assert_close(_tokens(rot[1])[i], expected, atol=1e-5, rtol=1e-5)


# ---- 3. usage penalty ----------------------------------------------------------------------------


def test_usage_penalty_spreads_a_collapsed_assignment_and_stays_finite():
    torch.manual_seed(4)
    K = 8
    angles = torch.arange(K) * (2 * math.pi / K)
    codes = torch.stack([angles.cos(), angles.sin()], 1) * 2
    vq = VectorQuantizer(K, 2, beta=0.0, usage_weight=1.0, usage_temperature=1.0)
    _set_codebook(vq, codes)
    vq.codebook.requires_grad_(False)
    z = (codes[0][None] + 0.05 * torch.randn(64, 2)).t().reshape(1, 2, 8, 8).requires_grad_()
    opt = torch.optim.Adam([z], lr=0.1)
    first = vq(z)
    assert first.ids.unique().numel() == 1
    for _ in range(40):
        out = vq(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = vq(z)
    assert last.ids.unique().numel() >= 6
    assert last.logs["usage"] < first.logs["usage"] - 1.0  # log K - H(p_bar) fell: batch entropy rose
    assert last.logs["perplexity"] > first.logs["perplexity"] + 3

    far = VectorQuantizer(K, 2, usage_weight=1.0, usage_temperature=1e-3)
    _set_codebook(far, codes)
    z = (1e3 * torch.randn(2, 2, 4, 4)).requires_grad_()
    out = far(z)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    assert torch.isfinite(far.codebook.grad).all()
    assert out.logs["usage"] > 0
    far.eval()
    assert torch.isfinite(far(z).loss)


# ---- 4. restarts, warm start, initialisation ------------------------------------------------------


@pytest.mark.parametrize("update", ["grad", "ema"])
def test_dead_codes_are_restarted_from_batch_latents(update):
    torch.manual_seed(5)
    K = 8
    codes = torch.cat([torch.zeros(1, 2), 50 + torch.arange(K - 1.0)[:, None].expand(-1, 2)])
    vq = VectorQuantizer(K, 2, codebook_update=update, restart_after=2, restart_noise=0.01, usage_weight=0.1)
    _set_codebook(vq, codes)
    z1 = 0.3 * torch.randn(1, 2, 4, 4)
    out = vq(z1)
    assert out.logs["restarts"].item() == 0
    assert vq.steps_since_used.tolist() == [0] + [1] * (K - 1)
    z2 = (0.3 * torch.randn(1, 2, 4, 4)).requires_grad_()
    out = vq(z2)
    out.loss.backward()  # in-place restart must not break the backward pass
    assert out.logs["restarts"].item() == K - 1
    assert vq.steps_since_used.tolist() == [0] * K
    latents = _tokens(z2.detach())
    new = vq.codebook[1:].detach()
    nearest = torch.cdist(new, latents).min(1)
    assert (nearest.values <= 0.05 * latents[nearest.indices].norm(dim=1) + 1e-6).all()
    assert (new.norm(dim=1) < 5).all()
    if update == "ema":
        assert vq.cluster_size[1:].tolist() == [1.0] * (K - 1)
        torch.testing.assert_close(vq.embed_sum[1:], new)
    assert vq.num_updates.item() == 2


def test_warm_start_bypasses_exactly_pretrain_steps_then_inits_from_that_batch():
    torch.manual_seed(6)
    K, D = 8, 4
    vq = VectorQuantizer(K, D, init="latent", pretrain_steps=3)
    before = vq.codebook.detach().clone()
    for i in range(3):
        z = torch.randn(2, D, 4, 4)
        vq.eval()
        assert (vq(z).ids == -1).all()  # eval during the warm-up bypasses but does not count
        vq.train()
        out = vq(z)
        assert torch.equal(out.z_q, z) and (out.ids == -1).all() and out.loss.item() == 0.0
        assert vq.pretrain_steps_done.item() == i + 1 and vq.initialized.item() == 0
    assert vq.pretrain_steps_done.item() == 3 and torch.equal(vq.codebook, before)
    z4 = torch.randn(2, D, 4, 4)
    out = vq(z4)
    assert vq.initialized.item() == 1
    latents = _tokens(z4)
    match = torch.cdist(vq.codebook.detach(), latents)
    assert (match.min(1).values == 0).all()  # every code is a latent of this batch
    assert match.argmin(1).unique().numel() == K  # distinct latents
    assert out.logs["usage_fraction"].item() == 1.0  # initialised before this batch was quantized
    assert (out.ids >= 0).all() and not torch.equal(out.z_q, z4)


def test_latent_init_tiles_with_noise_and_kmeans_beats_it():
    torch.manual_seed(7)
    vq = VectorQuantizer(12, 3, init="latent", restart_noise=0.01)
    z = torch.randn(1, 3, 2, 2)  # 4 latents for 12 codes
    vq(z)
    codes = vq.codebook.detach()
    assert torch.equal(codes[:4].sort(0).values, _tokens(z).sort(0).values)
    assert torch.cdist(codes, codes).add(torch.eye(12)).min() > 0  # repeats are jittered apart

    z = torch.randn(4, 3, 8, 8)
    errors = {}
    for init in ("latent", "kmeans"):
        vq = VectorQuantizer(16, 3, init=init, kmeans_iters=10, seed=3)
        vq(z)
        vq.eval()
        errors[init] = vq(z).logs["commit"].item()
    assert errors["kmeans"] < 0.8 * errors["latent"]


def test_bad_options_and_shapes_raise():
    with pytest.raises(TesseraError):
        VectorQuantizer(8, 4, codebook_update="adam")
    with pytest.raises(TesseraError):
        VectorQuantizer(8, 4, codebook_update="ema", legacy_beta=True)
    with pytest.raises(TesseraError):
        VectorQuantizer(8, 4, init="orthogonal")
    vq = VectorQuantizer(8, 4)
    with pytest.raises(TesseraError):
        vq(torch.randn(2, 3, 4, 4))
    with pytest.raises(TesseraError):
        vq.quantize(torch.randn(5, 3))


# ---- 5. one process vs two --------------------------------------------------------------------------


def test_two_processes_match_one_process(tmp_path):
    path = ROOT / "tests" / "dist_quantizer_worker.py"
    spec = importlib.util.spec_from_file_location("dist_quantizer_worker", path)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    single = worker.train(world=1, rank=0, global_batch=8, steps=6, names=["ema", "grad"])  # the whole batch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(path), "--global-batch", "8", "--steps", "6", "--configs", "ema,grad",
           "--out", str(tmp_path / "ddp.pt")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for cfg in ("ema", "grad"):
        assert single[f"{cfg}.restarts"] > 0 and single[f"{cfg}.restarts"] == ddp[f"{cfg}.restarts"]
        assert single[cfg]["quantize.initialized"].item() == 1
        assert single[cfg].keys() == ddp[cfg].keys()
        for key, value in single[cfg].items():
            torch.testing.assert_close(ddp[cfg][key], value, rtol=0, atol=1e-5, msg=f"{cfg}: {key}")
