"""Checkpoints: atomic writes, weights-only loads, safetensors export.

``last.pt`` is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import TesseraError


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; a file that pickles code-carrying objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise TesseraError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TesseraError(
            f"refusing to load {path}: it pickles objects other than tensors and plain containers "
            f"({first[:160]}); tessera only reads weights-only checkpoints — convert foreign ones with "
            f"convert_checkpoint.py"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise TesseraError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from e


def export_safetensors(state_dict: dict, path: Path, metadata: dict | None = None) -> None:
    """Weights-only export (contiguous, unshared tensors)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items() if torch.is_tensor(v)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_state_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True) with one clear line naming the first mismatching key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key '{missing[0]}' (+{len(missing) - 1} more)")
        if unexpected:
            parts.append(f"unexpected key '{unexpected[0]}' (+{len(unexpected) - 1} more)")
        raise TesseraError(f"{what} does not match the model: {'; '.join(parts)}; check the config used to build it")
    for k, v in state.items():
        if torch.is_tensor(v) and own[k].shape != v.shape:
            raise TesseraError(
                f"{what} does not match the model: '{k}' has shape {tuple(v.shape)}, model expects "
                f"{tuple(own[k].shape)}; check the config used to build it"
            )
    module.load_state_dict(state, strict=True)
