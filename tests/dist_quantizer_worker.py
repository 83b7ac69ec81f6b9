"""Trains a tiny conv encoder + quantizer + conv decoder for a few SGD steps, as a plain process
(whole global batch) or under torchrun (rank r takes rows [r*B/W, (r+1)*B/W) of every global batch).

Used by tests/test_quantizers.py (VectorQuantizer: EMA, restarts, latent and k-means init, usage penalty) and
tests/test_rq.py (ResidualQuantizer: latent init depth by depth, one EMA step per forward from all depths,
restarts) to check that the codebook machinery gives the same weights for any number of processes. Rank 0 saves
{config name: state_dict, "<name>.restarts": codes restarted in total} to --out.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from models.tokenizers.quantizers import VectorQuantizer  # noqa: E402
from models.tokenizers.rq import ResidualQuantizer  # noqa: E402

CONFIGS = {
    "ema": (VectorQuantizer, dict(codebook_size=24, dim=4, codebook_update="ema", ema_decay=0.8, init="latent",
                                  restart_after=2, usage_weight=0.5, usage_temperature=0.5)),
    "grad": (VectorQuantizer, dict(codebook_size=24, dim=3, input_dim=4, cosine=True, init="kmeans",
                                   kmeans_iters=3, restart_after=2, usage_weight=0.5, pretrain_steps=1,
                                   gradient="rotation")),
    "rq_shared": (ResidualQuantizer, dict(codebook_size=16, dim=4, depth=3, shared_codebook=True, ema_decay=0.8,
                                          init="latent", restart_after=1)),
    "rq_per_depth": (ResidualQuantizer, dict(codebook_size=12, dim=4, depth=2, shared_codebook=False,
                                             ema_decay=0.8, init="latent", restart_after=1)),
}


class TinyAutoencoder(nn.Module):
    def __init__(self, quantizer: type, kwargs: dict):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 1)
        self.quantize = quantizer(**kwargs)
        self.dec = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        out = self.quantize(self.enc(x))
        return F.mse_loss(self.dec(out.z_q), x) + out.loss, out.logs["restarts"]


def global_batch_at(step: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, 3, 4, 4, generator=g)


def train(world: int, rank: int, global_batch: int, steps: int, names: list[str]) -> dict:
    """Train the named CONFIGS on this process's share of each global batch -> results."""
    if global_batch % world:
        raise SystemExit("--global-batch must be divisible by the number of processes")
    per_rank = global_batch // world
    result = {}
    for name in names:
        torch.manual_seed(0)
        model = TinyAutoencoder(*CONFIGS[name])
        wrapped = DDP(model, broadcast_buffers=False) if world > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        restarts = 0.0
        for step in range(steps):
            x = global_batch_at(step, global_batch)[rank * per_rank:(rank + 1) * per_rank]
            loss, n_restarted = wrapped(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            restarts += float(n_restarted)
        result[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result[f"{name}.restarts"] = restarts
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    result = train(world, rank, args.global_batch, args.steps, args.configs.split(","))
    if rank == 0:
        torch.save(result, args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
