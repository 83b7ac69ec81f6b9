"""Time sampling (images/s at given batch sizes) and training (images/s; MFU on GPU) for any prior config.

    python benchmarks/bench.py --prior configs/shapes/prior/gpt.yaml --tokenizer configs/shapes/tokenizer/vq.yaml
    python benchmarks/bench.py --prior ... --tokenizer ... --batch-sizes 1,16,64 --sampling use_kv_cache=false
    python benchmarks/bench.py ... --append BENCHMARKS.md     # add the table, command, machine and date

Weights are random: speed does not depend on them (for samplers with early stopping, pass a run
directory with --prior-run instead). Images/s includes decoding with the tokenizer.
"""

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_prior, build_tokenizer, load_prior  # noqa: E402
from samplers.logits import check_sampling_kwargs  # noqa: E402
from samplers.rng import streams  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cond_for(prior, b, device):
    if "class" in prior.conditions and getattr(prior, "num_classes", 0):
        return {"class": torch.arange(b, device=device) % prior.num_classes}
    if "text" in prior.conditions and "none" not in prior.conditions:
        return {"text": ["a small red circle in the top left"] * b}
    return {}


def time_sampling(prior, tokenizer, batch, sampling, device, repeats):
    gens = streams(0, range(batch), device)
    prior.sample(cond_for(prior, batch, device), gens, **sampling)  # warm-up
    sync()
    t0 = time.perf_counter()
    for r in range(repeats):
        gens = streams(r + 1, range(batch), device)
        tokenizer.decode(prior.sample(cond_for(prior, batch, device), gens, **sampling))
    sync()
    return batch * repeats / (time.perf_counter() - t0)


def time_training(prior, tokenizer, batch, device, steps):
    prior.train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    shape = (batch, *tokenizer.token_shape)
    kind = tokenizer.kind
    tokens = torch.randn(shape, device=device) if kind == "kl" else torch.randint(
        tokenizer.codebook_size, shape, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    for i in range(steps + 2):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        with ctx:
            loss = prior(tokens, cond_for(prior, batch, device))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    ips = batch * steps / (time.perf_counter() - t0)
    prior.eval()
    return ips


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags that pick a prior: a trained run directory, or prior + tokenizer configs with random weights."""
    p.add_argument("--prior", help="prior config (random weights)")
    p.add_argument("--tokenizer", help="tokenizer config (random weights)")
    p.add_argument("--prior-run", help="a trained prior run directory instead of configs")
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--model", nargs="*", default=[], help="prior model overrides key=value (with --prior)")
    p.add_argument("--sampling", nargs="*", default=[], help="sampling overrides key=value")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model(args) -> tuple:
    """-> (prior, tokenizer, sampling kwargs: the run's or config's, overridden by --sampling, checked)."""
    device = torch.device(args.device)
    if args.prior_run:
        prior, tokenizer, cfg = load_prior(args.prior_run, device)
        sampling = dict(cfg.sampling)
    else:
        if not (args.prior and args.tokenizer):
            raise SystemExit("give --prior-run RUN_DIR, or both --prior and --tokenizer configs")
        pcfg, tcfg = OmegaConf.load(args.prior), OmegaConf.load(args.tokenizer)
        pcfg.model = OmegaConf.merge(pcfg.model, OmegaConf.from_dotlist(getattr(args, "model", [])))
        tokenizer = build_tokenizer(tcfg.model).to(device).eval()
        prior = build_prior(pcfg.model, tokenizer, num_classes=args.num_classes).to(device).eval()
        sampling = dict(pcfg.get("sampling", {}))
    sampling.update(OmegaConf.to_container(OmegaConf.from_dotlist(args.sampling)))
    sampling = check_sampling_kwargs(sampling, getattr(prior, "sampling_defaults", None))
    sampling.pop("rejection_n", None)
    return prior, tokenizer, sampling


def append_section(path: str, title: str, body: str) -> None:
    """Append '### title — date — machine', the command line and ``body`` to a markdown file."""
    path = Path(path)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured figures, newest last, each with its command and machine.\n")
    cmd = "python " + " ".join(sys.argv)
    with open(path, "a") as f:
        f.write(f"\n### {title} — {datetime.date.today()} — {machine()}\n\n`{cmd}`\n\n{body}\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--label", default=None, help="row label (default: the prior config name)")
    p.add_argument("--append", default=None, help="append the results to this markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    prior, tokenizer, sampling = load_model(args)
    label = args.label or Path(args.prior or args.prior_run).stem
    n_params = sum(p.numel() for p in prior.parameters())
    rows = []
    with torch.no_grad():
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            rows.append((f"sample b={b}", time_sampling(prior, tokenizer, b, sampling, device, args.repeats)))
    if not args.no_train:
        ips = time_training(prior, tokenizer, args.train_batch, device, args.train_steps)
        note = ""
        if device.type == "cuda":
            tokens = 1
            for s in tokenizer.token_shape:
                tokens *= s
            flops = 6 * n_params * tokens * ips
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            note = f" (MFU {100 * flops / (peak * 1e12):.1f} %)" if peak else ""
        rows.append((f"train b={args.train_batch}", ips, note))
    header = (f"{label}: {n_params / 1e6:.2f}M params, tokens {tuple(tokenizer.token_shape)}, "
              f"sampling {sampling}, {machine()}")
    lines = [f"| {label} | {r[0]} | {r[1]:.2f}{r[2] if len(r) > 2 else ''} |" for r in rows]
    print(header)
    print("| config | what | images/s |\n|---|---|---|")
    print("\n".join(lines))
    if args.append:
        table = "| config | what | images/s |\n|---|---|---|\n" + "\n".join(lines)
        append_section(args.append, label, f"{header}\n\n{table}")


if __name__ == "__main__":
    main()
