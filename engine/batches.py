"""Deterministic batches as a pure function of the step, for exact resume and process-count invariance.

The global stream is an endless concatenation of per-epoch permutations of the dataset, seeded by
``(seed, epoch)``. Step ``s`` consumes rows ``[s*B, (s+1)*B)`` of that stream; process ``r`` of ``W``
takes the contiguous slice ``[r*B/W, (r+1)*B/W)``. Random flips are decided per stream row, not by a
process-local RNG. So one process with global batch B and W processes with B/W each see the same data,
and a resumed run sees exactly what the uninterrupted one saw.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.errors import TesseraError


class FlipKeyed(Dataset):
    """Wraps a dataset of (x, y) so that dataset[(index, flip)] returns x mirrored when flip is set.

    The wrapped dataset may also return a tensor whose first dim indexes precomputed variants
    (a token cache stores [original, flipped]): then ``flip`` selects the variant.
    """

    def __init__(self, dataset: Dataset, variants: bool = False):
        self.dataset = dataset
        self.variants = variants

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        x, y = self.dataset[index]
        if self.variants:
            x = x[int(flip)]
        elif flip:
            x = torch.flip(x, dims=[-1])
        return x, y


def stream_rows(num_items: int, seed: int, start_row: int, count: int, flip: bool) -> list[tuple[int, bool]]:
    """Rows [start_row, start_row + count) of the global stream as (dataset index, flip) pairs."""
    out = []
    row = start_row
    while len(out) < count:
        epoch, offset = divmod(row, num_items)
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(num_items)
        flips = rng.random(num_items) < 0.5 if flip else np.zeros(num_items, dtype=bool)
        take = min(count - len(out), num_items - offset)
        out.extend((int(perm[offset + i]), bool(flips[offset + i])) for i in range(take))
        row += take
    return out


class StepBatchSampler:
    """Yields, for steps start_step, start_step+1, ..., the micro-batches of this process."""

    def __init__(self, num_items, global_batch, grad_accum, rank, world_size, seed, flip, start_step, max_steps):
        if global_batch % (world_size * grad_accum):
            raise TesseraError(
                f"train.batch_size={global_batch} is not divisible by processes x grad_accum "
                f"= {world_size} x {grad_accum}; pick a multiple"
            )
        self.num_items, self.global_batch, self.grad_accum = num_items, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.flip = rank, world_size, seed, flip
        self.start_step, self.max_steps = start_step, max_steps
        self.local = global_batch // world_size
        self.micro = self.local // grad_accum

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            rows = stream_rows(
                self.num_items, self.seed, step * self.global_batch + self.rank * self.local, self.local, self.flip
            )
            for m in range(self.grad_accum):
                yield rows[m * self.micro : (m + 1) * self.micro]

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.grad_accum


def step_loader(dataset, *, global_batch, grad_accum, rank, world_size, seed, flip, start_step, max_steps,
                num_workers=0, variants=False) -> DataLoader:
    """DataLoader over micro-batches; every ``grad_accum`` consecutive ones make one optimizer step."""
    if len(dataset) == 0:
        raise TesseraError("the training set is empty; check data.root")
    sampler = StepBatchSampler(len(dataset), global_batch, grad_accum, rank, world_size, seed, flip,
                               start_step, max_steps)
    return DataLoader(FlipKeyed(dataset, variants), batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
