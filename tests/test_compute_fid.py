"""compute_fid.py: the CLI's output, errors and exit codes, the feature cache, and the reference kinds.

Inception runs with random weights in the released key layout on a few 16x16 images per set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import compute_fid
from metrics.fid import frechet_distance
from metrics.inception import WEIGHTS_FILE, InceptionFeatures, write_random_weights
from metrics.inception_score import inception_score
from metrics.inputs import features_cache_path, open_images, source_features
from metrics.precision_recall import precision_recall

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, check=True):
    """python compute_fid.py ARGS from the repo root, in this session's environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "compute_fid.py", *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"compute_fid.py failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "inception-random" / WEIGHTS_FILE
    return path if path.is_file() else write_random_weights(path)


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def images(n: int, seed: int, offset: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3))
    return (base + offset + rng.integers(0, 56, (n, 16, 16, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two folders of 8 images (samples, reference) and an ADM-style .npz of the samples with labels."""
    root = tmp_path_factory.mktemp("fid-sets")
    out = {}
    for name, seed, offset in (("samples", 0, 0), ("reference", 1, 40)):
        arr = images(8, seed, offset)
        (root / name).mkdir()
        for i, img in enumerate(arr):
            Image.fromarray(img).save(root / name / f"{i}.png")
        out[name] = root / name
        out[f"{name}_array"] = arr
    np.savez(root / "samples.npz", arr_0=out["samples_array"], arr_1=np.arange(8) % 4)
    out["samples_npz"] = root / "samples.npz"
    return out


def test_missing_path_is_one_line_and_exit_2(tmp_path, inception_weights):
    out = run_cli(tmp_path / "nowhere", tmp_path, "--inception-weights", inception_weights, check=False)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere: no such file" in lines[0]


@pytest.mark.parametrize("case", ["no_arr_0", "float_images", "missing_weights", "stats_as_samples"])
def test_bad_inputs_exit_2(case, tmp_path, sets, inception_weights, capsys):
    weights = ["--inception-weights", str(inception_weights)]
    if case == "no_arr_0":
        np.savez(tmp_path / "x.npz", images=sets["samples_array"])
        args, needle = [str(tmp_path / "x.npz"), str(sets["reference"]), *weights], "no arr_0"
    elif case == "float_images":
        np.savez(tmp_path / "x.npz", arr_0=sets["samples_array"].astype(np.float32))
        args, needle = [str(tmp_path / "x.npz"), str(sets["reference"]), *weights], "expected uint8"
    elif case == "missing_weights":
        args, needle = [str(sets["samples"]), str(sets["reference"])], "pt_inception-2015-12-05-6726825d.pth"
    else:
        np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
        args, needle = [str(tmp_path / "stats.npz"), str(sets["reference"]), *weights], "no arr_0"
    assert compute_fid.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_cli_table_json_and_cache_hit(tmp_path, sets, inception_weights, monkeypatch):
    out_json = tmp_path / "out.json"
    out = run_cli(sets["samples"], sets["reference"], "--inception-weights", inception_weights,
                  "--json", out_json, "--kid", "--device", "cpu")
    results = json.loads(out_json.read_text())
    for row in ("FID", "IS", "precision", "recall", "KID"):
        assert any(line.startswith(row) for line in out.stdout.splitlines()), out.stdout
    assert results["num_samples"] == 8 and results["fid"] > 0 and 0 <= results["precision"] <= 1
    assert f"{results['fid']:.4f}" in out.stdout

    # Same images, same weights: served from $TESSERA_CACHE without running the network.
    inception = InceptionFeatures(inception_weights)
    for source in ("samples", "reference"):
        assert features_cache_path(open_images(sets[source]), inception).is_file()

    def no_network(*args, **kwargs):
        raise AssertionError("cache miss: Inception ran")

    monkeypatch.setattr(InceptionFeatures, "extract", no_network)
    again = compute_fid.evaluate(sets["samples"], sets["reference"], inception, kid=True)
    for key in ("fid", "is_mean", "is_std", "precision", "recall", "kid_mean"):
        assert again[key] == pytest.approx(results[key], rel=1e-6), key  # BLAS threads differ

    # The key is the content: one changed pixel is a different set of images.
    changed = tmp_path / "changed"
    changed.mkdir()
    for i, img in enumerate(sets["samples_array"]):
        img = img.copy()
        img[0, 0, 0] ^= 1 if i == 3 else 0
        Image.fromarray(img).save(changed / f"{i}.png")
    with pytest.raises(AssertionError, match="cache miss"):
        compute_fid.evaluate(changed, sets["reference"], inception)


def test_npz_samples_and_reference_kinds(tmp_path, sets, inception_weights):
    inception = InceptionFeatures(inception_weights)
    gen = source_features(open_images(sets["samples_npz"]), inception)
    from_folder = source_features(open_images(sets["samples"]), inception)
    # Same images, same features (up to float32 round-off, which depends on the thread count).
    np.testing.assert_allclose(gen.pool, from_folder.pool, rtol=1e-4, atol=1e-4)
    real = source_features(open_images(sets["reference"]), inception)

    # An ADM reference batch: FID against its mu/sigma, precision/recall against its images.
    mu, sigma = np.full(2048, 0.5), np.diag(np.linspace(0.5, 2.0, 2048))
    np.savez(tmp_path / "adm.npz", arr_0=sets["reference_array"], mu=mu, sigma=sigma)
    adm = compute_fid.evaluate(sets["samples_npz"], tmp_path / "adm.npz", inception)
    assert adm["fid"] == pytest.approx(frechet_distance(gen.mu, gen.sigma, mu, sigma), rel=1e-9)
    assert (adm["precision"], adm["recall"]) == pytest.approx(precision_recall(real.pool, gen.pool), abs=1e-9)
    assert adm["is_mean"] == pytest.approx(inception_score(gen.logits, splits=8)[0], rel=1e-9)

    # Statistics only: FID works, precision/recall and KID are reported as unavailable.
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    stats = compute_fid.evaluate(sets["samples_npz"], tmp_path / "stats.npz", inception, kid=True)
    assert stats["fid"] == pytest.approx(adm["fid"], rel=1e-12)
    assert stats["precision"] is None and stats["kid_mean"] is None
    assert "n/a" in compute_fid.format_table(stats)


def test_shapes_flag_passes_images_and_labels(tmp_path, sets, inception_weights, monkeypatch, capsys):
    import metrics.shapes as shapes
    seen = {}

    def fake_shapes_metrics(images, labels=None):
        seen.update(images=images, labels=labels)
        return {"num_images": len(images), "accuracy": 0.75, "fid": 1.5}

    monkeypatch.setattr(shapes, "shapes_metrics", fake_shapes_metrics)
    monkeypatch.setattr(compute_fid, "frechet_distance", lambda *stats: 0.0)  # not under test here
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code = compute_fid.main([str(sets["samples_npz"]), str(tmp_path / "stats.npz"), "--shapes", "--no-pr",
                             "--inception-weights", str(inception_weights)])
    assert code == 0
    np.testing.assert_array_equal(seen["images"], sets["samples_array"])  # uint8 NHWC
    np.testing.assert_array_equal(seen["labels"], np.arange(8) % 4)
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("shapes/accuracy"))
    assert row.split()[-1] == "0.7500"
    assert "precision" not in table
