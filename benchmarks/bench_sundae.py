"""SUNDAE sampling speed and self-stopping: sampler steps/s, images/s, and how many steps samples take.

    python benchmarks/bench_sundae.py --prior-run runs/sundae --num-samples 256 --batch-size 64
    python benchmarks/bench_sundae.py --prior configs/shapes/prior/sundae.yaml \
        --tokenizer configs/shapes/tokenizer/vq.yaml          # random weights: speed only
    python benchmarks/bench_sundae.py --prior-run runs/sundae --append BENCHMARKS.md

steps/s counts iterations of the sampling loop (one network pass over the still-running rows each);
images/s includes decoding with the tokenizer. Early stopping needs a trained prior (--prior-run): random
weights never settle, so every sample runs the full ``steps``.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import add_model_args, append_section, cond_for, load_model, machine, sync  # noqa: E402
from samplers.rng import streams  # noqa: E402


def run(prior, tokenizer, sampling: dict, num_samples: int, batch: int, device) -> dict:
    """Sample num_samples in batches; -> timing and the per-sample step counts."""
    warm = streams(10**6, range(min(batch, 4)), device)
    prior.run_sampler(cond_for(prior, len(warm), device), warm, **sampling)
    steps_run, loop_steps, elapsed = [], 0, 0.0
    for start in range(0, num_samples, batch):
        idx = list(range(start, min(num_samples, start + batch)))
        gens = streams(0, idx, device)
        sync()
        t0 = time.perf_counter()
        result = prior.run_sampler(cond_for(prior, len(idx), device), gens, **sampling)
        tokenizer.decode(result.codes.view(len(idx), *prior.token_shape))
        sync()
        elapsed += time.perf_counter() - t0
        steps_run.append(result.steps_run.cpu())
        loop_steps += len(result.temperatures)
    steps_run = torch.cat(steps_run).numpy()
    return {"images_per_s": num_samples / elapsed, "steps_per_s": loop_steps / elapsed, "steps_run": steps_run}


def describe(steps_run: np.ndarray, nominal: int) -> str:
    q = np.percentile(steps_run, [0, 10, 50, 90, 100])
    full = float((steps_run == nominal).mean())
    return (f"min {q[0]:.0f} / p10 {q[1]:.0f} / median {q[2]:.0f} / p90 {q[3]:.0f} / max {q[4]:.0f}, "
            f"mean {steps_run.mean():.1f}; {100 * full:.0f}% ran all {nominal}")


def histogram(steps_run: np.ndarray, nominal: int, bins: int = 8) -> str:
    edges = np.unique(np.linspace(steps_run.min(), nominal + 1, bins + 1).round().astype(int))
    counts, _ = np.histogram(steps_run, bins=edges)
    return " ".join(f"[{lo},{hi}):{c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--label", default=None)
    p.add_argument("--append", default=None, help="append the results to this markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    prior, tokenizer, sampling = load_model(args)
    with torch.no_grad():
        r = run(prior, tokenizer, sampling, args.num_samples, args.batch_size, device)
    label = args.label or Path(args.prior_run or args.prior).name
    n_params = sum(q.numel() for q in prior.parameters())
    shown = {k: sampling[k] for k in ("steps", "temperature", "temperature_end", "proportion", "proportion_end",
                                      "min_steps", "early_stop", "cfg")}
    header = (f"{label}: {n_params / 1e6:.2f}M params, tokens {tuple(prior.token_shape)}, {args.num_samples} samples "
              f"in batches of {args.batch_size}, sampling {shown}, {machine()}")
    table = ("| prior | sampler steps/s | images/s | steps per sample |\n|---|---|---|---|\n"
             f"| {label} | {r['steps_per_s']:.2f} | {r['images_per_s']:.2f} | "
             f"{describe(r['steps_run'], sampling['steps'])} |")
    hist = f"step-count histogram: {histogram(r['steps_run'], sampling['steps'])}"
    print(header, table, hist, sep="\n")
    if args.append:
        append_section(args.append, f"SUNDAE sampling: {label}", f"{header}\n\n{table}\n\n{hist}")


if __name__ == "__main__":
    main()
