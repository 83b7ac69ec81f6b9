import fcntl
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run shares (the session's temp folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def build_once(folder: Path):
    """Yield True to the one process that must build ``folder``'s contents, False once they are built.

    Workers wait on a file lock, so a fixture shared across xdist workers is built once per test run.
    """
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / ".built"
        yield not done.exists()
        done.touch()


@pytest.fixture(scope="session", autouse=True)
def _tessera_cache(tmp_path_factory):
    """Caches (shapes data, classifier, FID stats) go under one folder per run unless CI pins TESSERA_CACHE."""
    if "TESSERA_CACHE" not in os.environ:
        os.environ["TESSERA_CACHE"] = str(shared_dir(tmp_path_factory, "tessera-cache"))
    yield


def run_cli(*args, env_extra=None, check=True, timeout=900):
    """Run a tessera entry point (or torchrun) from the repo root; returns CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = [sys.executable, *[str(a) for a in args]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


SHAPES_VQ_TEST = ["train.max_steps=400", "train.log_every=50", "train.ckpt_every=400"]


@pytest.fixture(scope="session")
def shapes_vq(tmp_path_factory):
    """A VQ tokenizer trained briefly on the shapes set (8x8 codes, 512 codes; about 24 dB PSNR), with its
    token cache in RUN_DIR/cache/train. Shared by every prior test that consumes VQ codes."""
    folder = shared_dir(tmp_path_factory, "shapes-vq")
    run_dir = folder / "run"
    with build_once(folder) as build:
        if build:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_cli("main_tokenizer.py", "--config", "configs/shapes/tokenizer/vq.yaml", "--run-dir", run_dir,
                    *SHAPES_VQ_TEST)
            run_cli("main_tokenizer.py", "--cache", "--run-dir", run_dir)
    return run_dir


SHAPES_KL_TEST = ["train.max_steps=400", "train.log_every=50", "train.ckpt_every=400"]


@pytest.fixture(scope="session")
def shapes_kl(tmp_path_factory):
    """A KL tokenizer trained briefly on the shapes set (4 x 8 x 8 latents), its scale factor computed and its
    latent cache in RUN_DIR/cache/train. Shared by the KL tokenizer and MAR tests."""
    folder = shared_dir(tmp_path_factory, "shapes-kl")
    run_dir = folder / "run"
    with build_once(folder) as build:
        if build:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_cli("main_tokenizer.py", "--config", "configs/shapes/tokenizer/kl.yaml", "--run-dir", run_dir,
                    *SHAPES_KL_TEST)
            run_cli("main_tokenizer.py", "--compute-scale", "--run-dir", run_dir)
            run_cli("main_tokenizer.py", "--cache", "--run-dir", run_dir)
    return run_dir
