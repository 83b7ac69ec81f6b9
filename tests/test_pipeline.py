"""The generate-and-measure pipeline on the shapes set: GPT prior training, sampling (sharded, resumable,
ADM .npz layout), and the shapes metric against a weak baseline."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli

GPT_STEPS = 600


@pytest.fixture(scope="module")
def gpt_runs(shapes_vq, tmp_path_factory):
    """The shapes GPT trained for GPT_STEPS, and the same model stopped after 5 steps (the weak baseline)."""
    base = tmp_path_factory.mktemp("gpt")
    cache = f"train.cache={shapes_vq / 'cache' / 'train'}"
    runs = {}
    for name, steps in (("gpt", GPT_STEPS), ("weak", 5)):
        runs[name] = base / name
        run_cli("main_prior.py", "--config", "configs/shapes/prior/gpt.yaml", "--tokenizer", shapes_vq,
                "--run-dir", runs[name], cache, f"train.max_steps={steps}", "train.warmup_steps=20")
    return runs


def _sample(prior, out, n, *extra, procs=1):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port=29633"] if procs > 1 else []
    run_cli(*launcher, "main_sample.py", "--prior", prior, "--num-samples", n, "--out", out, "--batch-size", 50, *extra)
    return np.load(f"{out}.npz")


@pytest.mark.slow
def test_gpt_samples_have_the_right_class_and_beat_a_weak_baseline(gpt_runs, tmp_path):
    from metrics.shapes import shapes_metrics

    good = _sample(gpt_runs["gpt"], tmp_path / "good", 400, "sampling.cfg=2.0")
    weak = _sample(gpt_runs["weak"], tmp_path / "weak", 400, "sampling.cfg=2.0")
    m_good = shapes_metrics(good["arr_0"], labels=good["arr_1"])
    m_weak = shapes_metrics(weak["arr_0"], labels=weak["arr_1"])
    print("gpt", m_good, "weak", m_weak)
    assert m_good["accuracy"] >= 0.90
    assert m_good["fid"] < 0.5 * m_weak["fid"]


def test_npz_has_the_adm_layout(gpt_runs, tmp_path):
    data = _sample(gpt_runs["weak"], tmp_path / "s", 16)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (16, 32, 32, 3)
    assert data["arr_1"].dtype == np.int64 and list(data["arr_1"][:9]) == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert (tmp_path / "s" / "grid.png").exists()


def test_one_and_two_processes_give_the_same_images(gpt_runs, tmp_path):
    one = _sample(gpt_runs["weak"], tmp_path / "one", 24, "sampling.cfg=1.5")
    two = _sample(gpt_runs["weak"], tmp_path / "two", 24, "sampling.cfg=1.5", procs=2)
    assert np.array_equal(one["arr_0"], two["arr_0"])
    # batch size does not matter either
    other = _sample(gpt_runs["weak"], tmp_path / "bs", 24, "sampling.cfg=1.5", "--batch-size", 7)
    assert np.array_equal(one["arr_0"], other["arr_0"])


def test_killed_sampling_resumes_without_gaps_or_duplicates(gpt_runs, tmp_path):
    out = tmp_path / "k"
    n = 60
    args = [sys.executable, "main_sample.py", "--prior", str(gpt_runs["weak"]), "--num-samples", str(n), "--out",
            str(out), "--batch-size", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "images").glob("*.png"))) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((out / "images").glob("*.png")))
    assert 0 < partial < n
    data = _sample(gpt_runs["weak"], out, n)
    names = sorted(f.name for f in (out / "images").glob("*"))
    assert names == [f"{i:06d}.png" for i in range(n)]  # no temp files, no gaps
    ref = _sample(gpt_runs["weak"], tmp_path / "ref", n)
    assert np.array_equal(data["arr_0"], ref["arr_0"])


def test_gif_and_class_flag(gpt_runs, tmp_path):
    data = _sample(gpt_runs["gpt"], tmp_path / "c3", 8, "--class", 3, "--gif")
    assert list(data["arr_1"]) == [3] * 8
    from PIL import Image

    gif = Image.open(tmp_path / "c3" / "decoding.gif")
    assert gif.n_frames > 2


def test_sampling_bad_inputs(gpt_runs, tmp_path):
    for args, needle in ((["--class", "99"], "out of range"), (["sampling.cfgg=2"], "cfgg"),
                         (["--num-samples", "0"], "positive")):
        out = run_cli("main_sample.py", "--prior", gpt_runs["weak"], "--out", tmp_path / "x",
                      *(["--num-samples", "4"] if "--num-samples" not in args else []), *args, check=False)
        assert out.returncode == 2 and needle in out.stderr.strip().splitlines()[-1], out.stderr[-800:]
