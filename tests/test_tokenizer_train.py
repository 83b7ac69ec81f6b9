"""VQ tokenizer training end to end through main_tokenizer.py: distributed equality, exact resume after
SIGKILL, eval / reconstruct / cache, and one clear line for each bad input."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.checkpoint import load
from tests.conftest import ROOT, run_cli

TINY = [
    "model.autoencoder.ch=16", "model.autoencoder.ch_mult=[1,2]", "model.autoencoder.z_channels=16",
    "model.embed_dim=8", "model.autoencoder.resolution=16", "data.resolution=16",
    "model.quantizer.codebook_size=64", "model.quantizer.restart_after=2", "data.num_train=256",
    "data.num_val=64", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0",
]


def tiny_args(run_dir, *extra):
    return ["main_tokenizer.py", "--config", "configs/shapes/tokenizer/vq.yaml", "--run-dir", run_dir, *TINY, *extra]


def final_state(run_dir):
    return load(os.path.join(run_dir, "checkpoints", "last.pt"))["modules"]["model"]


def assert_close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_floating_point(a[k]):
            diff = (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
            assert diff <= tol, f"{k} differs by {diff}"
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_one_process_equals_two_processes(tmp_path):
    # Adam divides by sqrt(v) + eps: parameters whose true gradient is zero (a conv bias followed by a
    # one-channel-per-group GroupNorm) would turn summation-order noise of 1e-10 into lr-sized steps with
    # eps = 1e-8. eps = 1e-6 keeps that noise below the tolerance without changing what is compared.
    steps = ["train.max_steps=6", "train.ckpt_every=6", "train.eps=1e-6"]
    single = str(tmp_path / "one")
    run_cli(*tiny_args(single, *steps))
    ddp = str(tmp_path / "torchrun")
    run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611", *tiny_args(ddp, *steps))
    launch = str(tmp_path / "launch")
    run_cli("-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_port=29612",
            *tiny_args(launch, *steps))
    a = final_state(single)
    restarts = load(os.path.join(single, "log.jsonl").replace("log.jsonl", "checkpoints/last.pt"))
    assert restarts["step"] == 6
    assert_close(a, final_state(ddp), 1e-5)
    assert_close(a, final_state(launch), 1e-5)


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted(tmp_path):
    steps = ["train.max_steps=12", "train.ckpt_every=2"]
    ref = str(tmp_path / "ref")
    run_cli(*tiny_args(ref, *steps))
    run = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *tiny_args(run, *steps)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(run, "log.jsonl")
    target = random.Random(0).randint(3, 9)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load(os.path.join(run, "checkpoints", "last.pt"))["step"] < 12  # killed mid-run, last.pt readable
    run_cli(*tiny_args(run, *steps))
    assert_close(final_state(ref), final_state(run), 1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("vq") / "run")
    run_cli(*tiny_args(run_dir, "train.max_steps=30", "train.ckpt_every=30"))
    return run_dir


def test_eval_reconstruct_cache(trained):
    out = run_cli("main_tokenizer.py", "--eval", "--run-dir", trained)
    assert "psnr" in out.stdout and "codebook_usage" in out.stdout
    run_cli("main_tokenizer.py", "--reconstruct", "--run-dir", trained)
    assert os.path.exists(os.path.join(trained, "samples", "reconstruction.png"))
    run_cli("main_tokenizer.py", "--cache", "--run-dir", trained)
    import numpy as np

    tokens = np.load(os.path.join(trained, "cache", "train", "tokens.npy"))
    assert tokens.shape == (256, 2, 8, 8)
    # variant 1 is the tokenization of the mirrored image
    from data import build_dataset
    from models import load_tokenizer

    tok = load_tokenizer(trained)
    ds = build_dataset({"name": "shapes", "resolution": 16, "num_train": 256, "num_val": 64,
                        "random_flip": False}, "train")
    x = torch.stack([ds[i][0] for i in range(4)])
    assert torch.equal(tok.encode(x), torch.from_numpy(tokens[:4, 0]).long())
    assert torch.equal(tok.encode(torch.flip(x, dims=[-1])), torch.from_numpy(tokens[:4, 1]).long())


def _fails_with(args, needle, tmp_path=None):
    out = run_cli(*args, check=False)
    assert out.returncode != 0, out.stdout
    err = out.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], out.stderr[-2000:]
    return err[-1]


def test_bad_inputs_one_line(tmp_path, trained):
    # unknown / misspelled key
    _fails_with(tiny_args(str(tmp_path / "a"), "train.max_stepz=3"), "max_stepz")
    # missing data root
    _fails_with(tiny_args(str(tmp_path / "b"), "data.name=imagefolder", f"data.root={tmp_path / 'nowhere'}"),
                "nowhere")
    # empty data root
    (tmp_path / "empty").mkdir()
    _fails_with(tiny_args(str(tmp_path / "c"), "data.name=imagefolder", f"data.root={tmp_path / 'empty'}"), "empty")
    # images of the wrong size for the model
    _fails_with(tiny_args(str(tmp_path / "d"), "data.resolution=32"), "data.resolution=32")
    # a config that does not match the existing run: refused, nothing overwritten
    before = open(os.path.join(trained, "config.yaml")).read()
    _fails_with(tiny_args(trained, "model.quantizer.codebook_size=32"), "different model config")
    assert open(os.path.join(trained, "config.yaml")).read() == before
    # a run directory that is not one
    _fails_with(["main_tokenizer.py", "--eval", "--run-dir", str(tmp_path / "nothing")], "no config.yaml")


def test_corrupt_image_stops_or_is_skipped(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / c / f"{i}.png")
    (root / "a" / "3.png").write_bytes(b"not a png at all")
    args = tiny_args(str(tmp_path / "r"), "data.name=imagefolder", f"data.root={root}", "train.max_steps=3",
                     "model.quantizer.restart_after=0")
    _fails_with(args, "3.png")
    run_cli(*args, "data.skip_corrupt=true")


def test_nan_loss_stops_and_keeps_last_good(tmp_path):
    run_dir = str(tmp_path / "nan")
    run_cli(*tiny_args(run_dir, "train.max_steps=2", "train.ckpt_every=1"))
    good = final_state(run_dir)
    line = _fails_with(tiny_args(run_dir, "train.max_steps=6", "train.lr=1e30", "train.betas=[0.0,0.0]"),
                       "non-finite")
    assert "step" in line
    assert load(os.path.join(run_dir, "checkpoints", "last.pt"))["step"] >= 2
    assert final_state(run_dir).keys() == good.keys()


def test_gan_phase_trains_the_discriminator_after_disc_start(tmp_path):
    import json

    run_dir = tmp_path / "gan"
    gan = ["loss.disc_enabled=true", "loss.disc_start=2", "loss.disc_ndf=8", "loss.disc_layers=2",
           "loss.disc_norm=group", "train.max_steps=4", "train.ckpt_every=2"]
    run_cli(*tiny_args(str(run_dir), *gan))
    records = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    assert "d_loss" not in records[1] and "g_loss" not in records[1]  # step 2: discriminator still off
    assert "d_loss" in records[3] and records[3]["d_weight"] > 0
    state = load(run_dir / "checkpoints" / "last.pt")
    assert set(state["optimizers"]) == {"ae", "disc"} and state["optimizers"]["disc"]["state"]
    assert "disc" in state["modules"]
