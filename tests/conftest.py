import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _tessera_cache(tmp_path_factory):
    """Caches (shapes data, classifier, FID stats) go under one session folder unless CI pins TESSERA_CACHE."""
    if "TESSERA_CACHE" not in os.environ:
        os.environ["TESSERA_CACHE"] = str(tmp_path_factory.mktemp("tessera-cache"))
    yield


def run_cli(*args, env_extra=None, check=True, timeout=900):
    """Run a tessera entry point (or torchrun) from the repo root; returns CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = [sys.executable, *[str(a) for a in args]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out
