"""Engine: config schema, checkpoint safety and atomicity, deterministic batches, LR schedule."""

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from engine.batches import StepBatchSampler, stream_rows
from engine.checkpoint import atomic_save, load, load_state_strict
from engine.config import LOG_DEFAULTS, TRAIN_DEFAULTS, load_config
from engine.errors import TesseraError
from engine.train_loop import lr_at

SECTIONS = {"model": {}, "train": TRAIN_DEFAULTS, "log": LOG_DEFAULTS}


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_config_merges_overrides(tmp_path):
    p = _yaml(tmp_path, "model: {target: vq, width: 3}\ntrain: {lr: 0.5}\n")
    cfg = load_config(str(p), ["train.max_steps=7", "model.width=4"], SECTIONS)
    assert cfg.train.lr == 0.5 and cfg.train.max_steps == 7 and cfg.model.width == 4
    assert cfg.train.batch_size == TRAIN_DEFAULTS["batch_size"]


@pytest.mark.parametrize(
    "text,overrides,needle",
    [
        ("train: {lrr: 0.1}\n", [], "lrr"),
        ("train: {lr: 0.1}\n", ["train.max_step=3"], "max_step"),
        ("trian: {lr: 0.1}\n", [], "trian"),
        ("train: {lr: 0.1}\n", ["foo.bar=1"], "foo.bar"),
        ("train: {lr: 0.1}\n", ["train.lr"], "key=value"),
    ],
)
def test_config_unknown_key_names_it(tmp_path, text, overrides, needle):
    with pytest.raises(TesseraError, match=needle.replace(".", r"\.")):
        load_config(str(_yaml(tmp_path, text)), overrides, SECTIONS)


def test_config_missing_file(tmp_path):
    with pytest.raises(TesseraError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), [], SECTIONS)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_refuses_code_carrying_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Boom()}, f)
    with pytest.raises(TesseraError, match="refusing to load"):
        load(path)
    # the same through torch.save (zip format)
    path2 = tmp_path / "evil2.pt"
    torch.save({"w": torch.zeros(2), "obj": Boom()}, path2)
    with pytest.raises(TesseraError, match="refusing to load"):
        load(path2)


def test_atomic_save_never_leaves_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def crash(*a, **k):
        raise OSError("disk died")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, path)
    assert load(path)["step"] == 1


def test_strict_load_names_key():
    m = torch.nn.Linear(2, 3)
    with pytest.raises(TesseraError, match="missing key 'bias'"):
        load_state_strict(m, {"weight": torch.zeros(3, 2)}, "ckpt")
    with pytest.raises(TesseraError, match="shape"):
        load_state_strict(m, {"weight": torch.zeros(2, 2), "bias": torch.zeros(3)}, "ckpt")


def test_batches_are_process_count_invariant():
    n, B = 37, 8
    one = list(StepBatchSampler(n, B, 1, 0, 1, seed=3, flip=True, start_step=0, max_steps=10))
    r0 = list(StepBatchSampler(n, B, 1, 0, 2, seed=3, flip=True, start_step=0, max_steps=10))
    r1 = list(StepBatchSampler(n, B, 1, 1, 2, seed=3, flip=True, start_step=0, max_steps=10))
    assert [a + b for a, b in zip(r0, r1)] == one
    # resume at step 4 sees exactly the remaining batches
    resumed = list(StepBatchSampler(n, B, 1, 0, 1, seed=3, flip=True, start_step=4, max_steps=10))
    assert resumed == one[4:]
    # grad accumulation splits a step into micro-batches of the same rows
    acc = list(StepBatchSampler(n, B, 2, 0, 1, seed=3, flip=True, start_step=0, max_steps=10))
    assert [acc[2 * i] + acc[2 * i + 1] for i in range(10)] == one
    # every epoch is a permutation
    rows = stream_rows(n, 3, 0, n, flip=False)
    assert sorted(i for i, _ in rows) == list(range(n))


def test_batch_not_divisible():
    with pytest.raises(TesseraError, match="divisible"):
        StepBatchSampler(10, 7, 1, 0, 2, 0, False, 0, 1)


def test_lr_schedule():
    cfg = OmegaConf.create(dict(TRAIN_DEFAULTS, lr=1.0, warmup_steps=10, schedule="cosine", max_steps=110,
                                min_lr_ratio=0.1))
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
