"""metrics/: FID / IS / KID / precision-recall against reference computations, image inputs, recon metrics.

The Inception network is torch-fidelity's, loaded from a random-weights file in the released key
layout (metrics.inception.write_random_weights); nothing is downloaded.
"""

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from scipy import linalg
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

import compute_fid
from engine.errors import TesseraError
from metrics.fid import feature_statistics, frechet_distance
from metrics.inception import WEIGHTS_FILE, InceptionFeatures, write_random_weights
from metrics.inception_score import inception_score
from metrics.inputs import open_images, open_reference, to_uint8
from metrics.kid import kernel_inception_distance
from metrics.precision_recall import inside_manifold, knn_radii, precision_recall
from metrics.recon import ReconMetrics, build_lpips, psnr, ssim, write_random_vgg_weights


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "inception-random" / WEIGHTS_FILE
    return path if path.is_file() else write_random_weights(path)


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path, monkeypatch):
    """No test may find (or fetch into) a real torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def make_images(n: int, size: int, seed: int, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Smooth random gratings plus noise: uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        fx, fy = rng.uniform(0.5, 3, 2)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy))[..., None] + rng.uniform(0, 6, 3)
        img = 127.5 + 90 * np.sin(wave) * np.asarray(tint) + rng.normal(0, 12, (size, size, 3))
        out.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def write_folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:04d}.png")
    return path


# ----------------------------------------------------------------------------- FID / IS vs torch-fidelity


def test_fid_and_is_match_torch_fidelity(tmp_path, inception_weights):
    a = write_folder(tmp_path / "a", make_images(24, 32, seed=0))
    b = write_folder(tmp_path / "b", make_images(24, 32, seed=1, tint=(1.0, 0.4, 0.7)))
    ours = compute_fid.evaluate(a, b, inception_weights=inception_weights, pr=False, cache=False)
    ref = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, isc=True, cuda=False, batch_size=50, cache=False,
        feature_extractor_weights_path=str(inception_weights), save_cpu_ram=True, verbose=False)
    assert ours["fid"] > 1.0  # two different distributions: a real distance to compare
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert ref["inception_score_mean"] > 1.05  # the random logits vary from image to image
    assert ours["is_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-3)
    assert ours["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-3, abs=1e-6)


def test_frechet_distance_matches_scipy_and_torch_fidelity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    np.testing.assert_allclose(s1, np.cov(x, rowvar=False), rtol=1e-12)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)  # FID(x, x) = 0
    assert frechet_distance(mu1, s1, mu1 + 2.0, s1) == pytest.approx(4.0 * 32, rel=1e-8)
    # Rank-deficient covariances (fewer samples than dimensions), as torch-fidelity computes them.
    small = [feature_statistics(rng.normal(size=(20, 64)) + shift) for shift in (0.0, 0.3)]
    tf = fid_statistics_to_metric({"mu": small[0][0], "sigma": small[0][1]},
                                  {"mu": small[1][0], "sigma": small[1][1]}, verbose=False)
    assert frechet_distance(*small[0], *small[1]) == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    with pytest.raises(TesseraError, match="shape"):
        frechet_distance(mu1, s1, mu1[:4], s1[:4, :4])


def test_inception_score_and_kid_match_torch_fidelity():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(103, 1008)) * 3 + rng.normal(size=(1, 1008))
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-10)
    assert inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)  # one class everywhere

    f1, f2 = rng.normal(size=(120, 64)), rng.normal(size=(90, 64)) + 0.2
    ref = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7,
                                 kid_subset_size=50, verbose=False)
    kid_mean, kid_std, size = kernel_inception_distance(f1, f2, subsets=7, subset_size=50)
    assert size == 50
    assert kid_mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert kid_std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-8)
    assert kernel_inception_distance(f1, f2, subsets=2)[2] == 90  # clamped to the smaller set


# ----------------------------------------------------------------------------- precision / recall


def brute_force_pr(ref, gen, k=3):
    radius_ref = np.sort(cdist(ref, ref), axis=1)[:, k]
    radius_gen = np.sort(cdist(gen, gen), axis=1)[:, k]
    d = cdist(gen, ref)
    return (d <= radius_ref[None]).any(1).mean(), (d.T <= radius_gen[None]).any(1).mean()


def test_precision_recall_matches_brute_force_knn():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(150, 16))
    gen = rng.normal(size=(120, 16)) * 1.3 + 0.4
    expected = brute_force_pr(ref, gen)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a non-trivial case
    assert precision_recall(ref, gen, dtype=torch.float64) == pytest.approx(expected)
    # Tiny blocks exercise the chunked k-NN and the chunked membership test.
    t_ref, t_gen = torch.from_numpy(ref), torch.from_numpy(gen)
    radii = knn_radii(t_ref, 3, row_block=7, col_block=5)
    np.testing.assert_allclose(radii.numpy(), np.sort(cdist(ref, ref), axis=1)[:, 3], rtol=1e-10)
    inside = inside_manifold(t_gen, t_ref, radii, row_block=11, col_block=13)
    assert inside.double().mean().item() == pytest.approx(expected[0])


def test_precision_recall_known_cases():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)  # disjoint, far apart
    assert precision_recall(x, x[:40])[0] == 1.0  # a subset lies inside the reference manifold
    with pytest.raises(TesseraError, match="more than 3"):
        precision_recall(x[:3], x)


# ----------------------------------------------------------------------------- image sources


def test_npz_reads_like_the_folder_of_the_same_images(tmp_path):
    images = make_images(7, 24, seed=4)
    folder = open_images(write_folder(tmp_path / "imgs", images))
    labels = np.arange(7) % 3
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=labels)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for source in (folder, open_images(tmp_path / "plain.npz"), open_images(tmp_path / "packed.npz")):
        batches = list(source.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1] and all(b.dtype == torch.uint8 for b in batches)
        assert torch.equal(torch.cat(batches), expected)
    np.testing.assert_array_equal(open_images(tmp_path / "plain.npz").labels, labels)
    np.testing.assert_array_equal(folder.read_all(), images)
    # A reference npz with images but no statistics is an image source too.
    assert open_reference(tmp_path / "plain.npz").kind == "images"


def test_folder_is_recursive_sorted_and_makes_rgb(tmp_path):
    rgb = make_images(3, 16, seed=5)
    root = tmp_path / "tree"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    Image.fromarray(rgb[0]).save(root / "b" / "0.png")
    Image.fromarray(rgb[1]).save(root / "a" / "9.png")
    Image.fromarray(rgb[2][..., 0]).save(root / "a" / "1.png")  # grayscale
    Image.fromarray(np.dstack([rgb[0], np.full((16, 16), 7, np.uint8)])).save(root / "c.png")  # RGBA
    Image.fromarray(make_images(1, 20, seed=6)[0]).save(root / "d.jpg")  # another size
    (root / "notes.txt").write_text("not an image")
    source = open_images(root)
    names = [p.relative_to(root).as_posix() for p in source.files]
    assert names == ["a/1.png", "a/9.png", "b/0.png", "c.png", "d.jpg"]
    batches = list(source.batches(8))
    assert [tuple(b.shape) for b in batches] == [(4, 3, 16, 16), (1, 3, 20, 20)]
    first = batches[0].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(first[0], np.repeat(rgb[2][..., :1], 3, axis=2))
    np.testing.assert_array_equal(first[3], rgb[0])  # alpha dropped
    with pytest.raises(TesseraError, match="differ in size"):
        source.read_all()


def test_bad_npz_and_paths_raise(tmp_path):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(TesseraError, match="uint8"):
        open_images(tmp_path / "floats.npz")
    with pytest.raises(TesseraError, match="no arr_0"):
        open_images(tmp_path / "stats.npz")
    with pytest.raises(TesseraError, match="neither images"):
        open_reference(tmp_path / "other.npz")
    with pytest.raises(TesseraError, match="no such file"):
        open_images(tmp_path / "missing")
    stats = open_reference(tmp_path / "stats.npz")
    assert stats.kind == "stats" and stats.images is None and stats.sigma.shape == (4, 4)


def test_dataset_config_source(tmp_path):
    from data import build_dataset

    data = {"name": "shapes", "root": str(tmp_path / "shapes"), "resolution": 16, "num_train": 12,
            "num_val": 6, "random_flip": True}  # flips are switched off for evaluation
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n" + "".join(f"  {k}: {v}\n" for k, v in data.items()))
    source = open_images(f"{config}:val")
    dataset = build_dataset({**data, "random_flip": False}, "val")
    assert len(source) == 6
    expected = torch.stack([to_uint8(dataset[i][0]) for i in range(6)])
    assert torch.equal(torch.cat(list(source.batches(4))), expected)
    np.testing.assert_array_equal(source.labels, [int(dataset[i][1]) for i in range(6)])
    assert len(open_images(config)) == 12  # the train split by default


def test_to_uint8_inverts_the_standard_normalisation():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(x.float() / 127.5 - 1), x)


# ----------------------------------------------------------------------------- Inception weights


def test_missing_or_wrong_inception_weights(tmp_path, inception_weights):
    with pytest.raises(TesseraError) as e:
        InceptionFeatures()
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "--inception-weights" in msg
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in msg and "\n" not in msg
    with pytest.raises(TesseraError, match="does not exist"):
        InceptionFeatures(tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(TesseraError, match="not torch-fidelity's Inception"):
        InceptionFeatures(wrong)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    # The torch hub cache is where torch-fidelity itself would look; either published name is found there.
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    assert InceptionFeatures().weights_path == cached


def test_inception_features_shapes_and_dtype(inception_weights):
    net = InceptionFeatures(inception_weights)
    out = net(torch.from_numpy(make_images(2, 32, seed=7)).permute(0, 3, 1, 2))
    assert out["pool"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    assert out["pool"].dtype == torch.float64 and torch.isfinite(out["pool"]).all()
    with pytest.raises(TesseraError, match="uint8"):
        net(torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------- reconstruction metrics


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two [H, W, C] images on [0, 255]: scipy Gaussian filtering, borders cropped."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        f = lambda t: gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_match_reference_implementations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 20, generator=g) * 2 - 1
    x_hat = (x + 0.1 * torch.randn(3, 3, 24, 20, generator=g)).clamp(-1, 1)
    a, b = ((x.double() + 1) * 127.5).numpy(), ((x_hat.double() + 1) * 127.5).numpy()
    mse = ((a - b) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(x, x_hat).numpy(), 10 * np.log10(255**2 / mse), rtol=1e-12)
    expected = [ssim_reference(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0)) for i in range(3)]
    np.testing.assert_allclose(ssim(x, x_hat).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, rtol=1e-12)
    assert torch.isinf(psnr(x, x)).all()
    # A value known in closed form: a constant offset of 1/127.5 is an error of one grey level.
    one_level = torch.full((1, 3, 16, 16), 1 / 127.5, dtype=torch.float64)
    assert psnr(torch.zeros_like(one_level), one_level).item() == pytest.approx(20 * np.log10(255), rel=1e-12)


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(allow_random=True)


def test_lpips_random_vgg_and_weights_file(tmp_path, random_lpips):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert random_lpips(x, x).abs().max().item() == 0.0
        assert (random_lpips(x, x.flip(-1)) > 0).all()
    with pytest.raises(TesseraError, match="vgg16-397923af.pth"):
        build_lpips()
    weights = write_random_vgg_weights(tmp_path / "vgg16-397923af.pth", seed=3)
    loaded = build_lpips(vgg_weights=weights)
    state = torch.load(weights, weights_only=True)
    assert torch.equal(getattr(loaded.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(loaded.net.slice5, "28").bias, state["features.28.bias"])
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(TesseraError, match="not torchvision's VGG16"):
        build_lpips(vgg_weights=tmp_path / "bad.pth")


class PixelFeatures:
    """Stands in for InceptionFeatures (same call contract) so rFID's plumbing is checked in milliseconds."""

    def __call__(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return {"pool": images[:, :, ::8, ::8].flatten(1).double()}


def test_recon_metrics_accumulate_and_rfid(inception_weights, random_lpips):
    g = torch.Generator().manual_seed(2)
    xs = [torch.rand(5, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    x_hats = [(x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1) for x in xs]
    metrics = ReconMetrics(lpips_net=random_lpips, inception=PixelFeatures())
    for x, x_hat in zip(xs, x_hats):
        metrics.update(x, x_hat)
    out = metrics.compute()
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    assert out["psnr"] == pytest.approx(psnr(x, x_hat).mean().item(), rel=1e-12)
    assert out["ssim"] == pytest.approx(ssim(x, x_hat).mean().item(), rel=1e-12)
    with torch.no_grad():
        assert out["lpips"] == pytest.approx(random_lpips(x, x_hat).mean().item(), rel=1e-5)
    real, fake = (PixelFeatures()(to_uint8(t))["pool"].numpy() for t in (x, x_hat))
    assert out["rfid"] > 0
    expected = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert out["rfid"] == pytest.approx(expected)
    # A weights path makes the real extractor; with none given and none cached, rFID is left out.
    with_weights = ReconMetrics(lpips_net=random_lpips, inception_weights=inception_weights)
    assert with_weights.inception.weights_path == inception_weights
    plain = ReconMetrics(lpips_net=random_lpips)
    plain.update(x, x_hat)
    assert plain.inception is None and set(plain.compute()) == {"psnr", "ssim", "lpips"}
