"""MAR sampling time per image against num_iter, and the share of it spent in the diffusion head (DiffLoss).

    python benchmarks/bench_mar.py --prior configs/imagenet256/prior/mar_b.yaml \
        --tokenizer configs/imagenet256/tokenizer/kl16.yaml --num-classes 1000 --num-iters 16,32,64,256 --batch 64
    python benchmarks/bench_mar.py --prior-run runs/mar --num-iters 4,8,16 --append BENCHMARKS.md

With configs the weights are random (speed does not depend on them). The head's time is measured around every
DiffLoss.sample call (synchronised on GPU); the rest of prior.sample is the transformer; decoding is timed apart.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import add_model_args, append_section, cond_for, load_model, machine, sync  # noqa: E402
from samplers.rng import streams  # noqa: E402


class HeadTimer:
    """Wraps prior.diffloss.sample and adds up the seconds spent inside it."""

    def __init__(self, head):
        self.inner, self.seconds = head.sample, 0.0
        head.sample = self

    def __call__(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - t0
        return out


def time_num_iter(prior, tokenizer, timer: HeadTimer, sampling: dict, num_iter: int, batch: int, repeats: int,
                  device) -> tuple:
    """-> (s / image in prior.sample, s / image inside DiffLoss (``timer`` wraps it), s / image decoding)."""
    timer.seconds = total = decode = 0.0
    cond = cond_for(prior, batch, device)
    for r in range(repeats):
        gens = streams(r + 1, range(batch), device)
        sync()
        t0 = time.perf_counter()
        tokens = prior.sample(cond, gens, **{**sampling, "num_iter": num_iter})
        sync()
        t1 = time.perf_counter()
        tokenizer.decode(tokens)
        sync()
        total += t1 - t0
        decode += time.perf_counter() - t1
    images = batch * repeats
    return total / images, timer.seconds / images, decode / images


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--num-iters", default="16,32,64,256")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--label", default=None)
    p.add_argument("--append", default=None, help="append the table to this markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    prior, tokenizer, sampling = load_model(args)
    if getattr(prior, "diffloss", None) is None:
        raise SystemExit("bench_mar.py times MAR priors (a model with a DiffLoss head); use benchmarks/bench.py")
    num_iters = [int(x) for x in args.num_iters.split(",")]
    if max(num_iters) > prior.seq_len:
        raise SystemExit(f"--num-iters {args.num_iters}: this prior has {prior.seq_len} tokens, num_iter <= that")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        prior.sample(cond_for(prior, 2, device), streams(0, range(2), device), **{**sampling, "num_iter": 2})
        timer = HeadTimer(prior.diffloss)
        rows = [(n, *time_num_iter(prior, tokenizer, timer, sampling, n, args.batch, args.repeats, device))
                for n in num_iters]
    n_params = sum(q.numel() for q in prior.parameters())
    head_params = sum(q.numel() for q in prior.diffloss.parameters())
    label = args.label or Path(args.prior_run or args.prior).stem
    shown = {k: v for k, v in sampling.items() if k not in ("num_iter", "top_k", "top_p", "use_kv_cache")}
    header = (f"{label}: {n_params / 1e6:.1f}M params (DiffLoss {head_params / 1e6:.1f}M), {prior.seq_len} tokens, "
              f"batch {args.batch}, {shown}, {machine()}")
    table = ("| num_iter | s / image (prior) | s / image in DiffLoss | DiffLoss share | s / image decode |\n"
             "|---|---|---|---|---|\n"
             + "\n".join(f"| {n} | {t:.4f} | {h:.4f} | {100 * h / t:.0f} % | {d:.4f} |" for n, t, h, d in rows))
    print(header)
    print(table)
    if args.append:
        append_section(args.append, f"{label}: MAR sampling time vs num_iter", f"{header}\n\n{table}")


if __name__ == "__main__":
    main()
