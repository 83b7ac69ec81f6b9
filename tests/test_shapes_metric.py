"""metrics/shapes.py: the offline shapes classifier, its accuracy and the shapes-FID in its feature space.

One classifier is trained per session (under 10 s on 2 idle cores) on a 2000-image tree, cached under the
session's TESSERA_CACHE (tests/conftest.py) and shared by every test here.
"""

import time

import numpy as np
import pytest
import torch

from data.shapes import CLASSES, ensure_shapes, render
from engine.errors import TesseraError
from metrics.fid import feature_statistics, frechet_distance
from metrics.shapes import (
    ShapesClassifier,
    classify,
    load_shapes_classifier,
    load_split,
    reference_statistics,
    shapes_metrics,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("shapes-metric") / "tree", 32, num_train=2000, num_val=1000)


@pytest.fixture(scope="module")
def classifier(tree):
    start = time.perf_counter()
    model = load_shapes_classifier(root=tree)
    print(f"shapes classifier ready in {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="module")
def train_sample(tree):
    """1000 train images in random order (the tree lists them class by class), float [-1, 1] and labels."""
    x, y = load_split(tree, "train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000]
    return x[order], y[order]


def test_classifier_is_accurate_on_val_and_cached(tree, classifier):
    x, y = load_split(tree, "val")
    features, predictions = classify(classifier, x)
    assert features.shape == (1000, 128)
    assert (predictions == y.numpy()).mean() >= 0.98
    start = time.perf_counter()
    again = load_shapes_classifier(root=tree)
    assert time.perf_counter() - start < 2  # read from the cache, not retrained
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])


def test_fid_is_small_for_real_images_and_large_for_wrong_ones(classifier, train_sample):
    x, y = train_sample
    real = shapes_metrics(x, y, classifier)
    assert real["num_images"] == 1000 and real["accuracy"] >= 0.98
    noise = shapes_metrics(torch.rand(1000, 3, 32, 32) * 2 - 1, classifier=classifier)
    one_class = shapes_metrics(x[y == 2], classifier=classifier)
    blurred = shapes_metrics(torch.nn.functional.avg_pool2d(x, 3, 1, 1), classifier=classifier)
    print(f"shapes-FID: train {real['fid']:.1f}, blurred {blurred['fid']:.1f}, "
          f"one class {one_class['fid']:.1f}, noise {noise['fid']:.1f}")
    assert real["fid"] * 2 < blurred["fid"]
    assert real["fid"] * 20 < one_class["fid"]
    assert real["fid"] * 30 < noise["fid"]
    assert "accuracy" not in noise


def test_shuffled_labels_score_chance(classifier, train_sample):
    x, y = train_sample
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    accuracy = shapes_metrics(x, shuffled, classifier)["accuracy"]
    assert abs(accuracy - 1 / len(CLASSES)) < 0.05


def test_fid_matches_a_direct_computation(tree, classifier, train_sample):
    x, _ = train_sample
    with torch.no_grad():
        ours = classifier.features(x).double()
        val = torch.cat([classifier.features(v) for v in load_split(tree, "val")[0].split(250)])
    ours, val = ours.numpy(), val.double().numpy()
    expected = frechet_distance(*feature_statistics(ours), *feature_statistics(val))
    mu, sigma = reference_statistics(classifier, "val")
    assert np.allclose(mu, val.mean(0)) and np.allclose(sigma, np.cov(val, rowvar=False))
    assert shapes_metrics(x, classifier=classifier)["fid"] == pytest.approx(expected, rel=1e-6)


def test_input_layouts_and_sizes_agree(classifier, train_sample):
    x, y = train_sample[0][:400], train_sample[1][:400]
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    by_float = shapes_metrics(x, y, classifier)
    by_uint8 = shapes_metrics(as_uint8.numpy(), y.numpy(), classifier)
    assert by_uint8["accuracy"] == by_float["accuracy"]
    assert by_uint8["fid"] == pytest.approx(by_float["fid"], rel=1e-3)
    # images drawn at 64x64 are resized to the classifier's 32x32 and still recognised
    labels = np.arange(400) % len(CLASSES)
    large = np.stack([render(int(c), np.random.default_rng([9, i]), 64) for i, c in enumerate(labels)])
    result = shapes_metrics(large, labels, classifier)
    swapped = shapes_metrics(x.flip(1), classifier=classifier)  # RGB -> BGR: right shapes, wrong colours
    print(f"shapes-FID at N=400: 64x64 renders {result['fid']:.1f}, same-size real {by_float['fid']:.1f}, "
          f"colour-swapped {swapped['fid']:.1f}")
    assert result["accuracy"] >= 0.98
    assert result["fid"] < 2 * by_float["fid"] < swapped["fid"]


def test_bad_inputs_say_what_is_wrong(classifier):
    with pytest.raises(TesseraError, match=r"\[N, H, W, 3\].*\(4, 32, 32\)"):
        shapes_metrics(np.zeros((4, 32, 32), np.uint8), classifier=classifier)
    with pytest.raises(TesseraError, match="4 images but 3 labels"):
        shapes_metrics(np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2], classifier)
    with pytest.raises(TesseraError, match="'train' or 'val'"):
        shapes_metrics(np.zeros((4, 32, 32, 3), np.uint8), classifier=classifier, reference="test")


def test_classifier_shapes():
    model = ShapesClassifier()
    x = torch.rand(3, 3, 48, 40) * 2 - 1
    assert model.features(x).shape == (3, 128) and model(x).shape == (3, len(CLASSES))
