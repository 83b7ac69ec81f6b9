"""Token caches: every training image encoded once, as itself and mirrored, for prior training.

Layout of a cache directory::

    tokens.npy   [N, 2, *token_shape]  variant 0 = the image, 1 = its horizontal flip
    labels.npy   [N] int64
    meta.json    {"num_items", "token_shape", "dtype", "kind", "tokenizer_step"}

A tokenizer may define ``cache_encode(x)`` (e.g. posterior moments for a KL tokenizer); otherwise
``encode(x)`` is stored.

Code remapping: ``write_codes_used(cache_dir, out)`` lists the code ids a VQ cache uses (both variants) in
``codes_used.npy`` (int64, sorted); a prior with ``model.remap=RUN/codes_used.npy`` then models only those
codes (``python main_tokenizer.py --remap --run-dir RUN`` writes RUN/codes_used.npy from RUN/cache/train).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from engine import dist
from engine.errors import TesseraError


@torch.no_grad()
def write_token_cache(tokenizer, dataset, out_dir: Path, env, batch_size: int = 64) -> Path:
    out_dir = Path(out_dir)
    encode = getattr(tokenizer, "cache_encode", tokenizer.encode)
    parts = out_dir.with_name(out_dir.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    indices = list(range(env.rank, len(dataset), env.world_size))
    tokens, labels = [], []
    for x, y in DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False):
        x = x.to(env.device)
        both = torch.stack([encode(x), encode(torch.flip(x, dims=[-1]))], dim=1)
        tokens.append(both.cpu())
        labels.append(torch.as_tensor(y).long())
    t = torch.cat(tokens).numpy()
    np.save(parts / f"tokens_{env.rank}.npy", t.astype(np.int32) if t.dtype.kind == "i" else t.astype(np.float32))
    np.save(parts / f"labels_{env.rank}.npy", torch.cat(labels).numpy())
    dist.barrier()
    if env.is_main:
        shards = [np.load(parts / f"tokens_{r}.npy") for r in range(env.world_size)]
        shard_labels = [np.load(parts / f"labels_{r}.npy") for r in range(env.world_size)]
        n = len(dataset)
        all_tokens = np.empty((n, *shards[0].shape[1:]), dtype=shards[0].dtype)
        all_labels = np.empty((n,), dtype=np.int64)
        for r in range(env.world_size):  # rank r holds indices r, r + W, r + 2W, ...
            all_tokens[r::env.world_size] = shards[r]
            all_labels[r::env.world_size] = shard_labels[r]
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "tokens.npy", all_tokens)
        np.save(tmp / "labels.npy", all_labels)
        meta = {"num_items": n, "token_shape": list(all_tokens.shape[2:]), "dtype": str(all_tokens.dtype),
                "kind": tokenizer.kind}
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    return out_dir


class TokenCacheDataset(Dataset):
    """cache[i] -> (tokens [2, *token_shape] (original, flipped), label)."""

    def __init__(self, path: Path, tokenizer=None):
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise TesseraError(
                f"no token cache at {path}; write one with: python main_tokenizer.py --cache --run-dir RUN_DIR"
            )
        self.meta = json.loads((path / "meta.json").read_text())
        if tokenizer is not None and list(self.meta["token_shape"]) != list(
            getattr(tokenizer, "cache_shape", tokenizer.token_shape)
        ):
            raise TesseraError(
                f"token cache {path} has token shape {self.meta['token_shape']} but the tokenizer makes "
                f"{list(tokenizer.token_shape)}; re-run main_tokenizer.py --cache for this tokenizer"
            )
        self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
        self.labels = np.load(path / "labels.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        t = torch.from_numpy(np.array(self.tokens[i]))
        return (t.long() if t.dtype == torch.int32 else t), int(self.labels[i])


def write_codes_used(cache_dir: Path, out_path: Path) -> tuple[Path, int]:
    """Write the sorted ids of every code the VQ token cache at `cache_dir` uses -> (out_path, count)."""
    cache_dir, out_path = Path(cache_dir), Path(out_path)
    if not (cache_dir / "meta.json").is_file():
        raise TesseraError(f"no token cache at {cache_dir}; write one with: python main_tokenizer.py --cache "
                           "--run-dir RUN_DIR")
    tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r")
    if tokens.dtype.kind not in "iu":
        raise TesseraError(f"token cache {cache_dir} holds {tokens.dtype} latents, not code ids; remapping "
                           "is for VQ tokenizers")
    used = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), 4096):
        used = np.union1d(used, np.unique(np.asarray(tokens[start : start + 4096])))
    tmp = out_path.with_name(out_path.stem + ".tmp.npy")
    np.save(tmp, used.astype(np.int64))
    tmp.replace(out_path)
    return out_path, int(used.size)
