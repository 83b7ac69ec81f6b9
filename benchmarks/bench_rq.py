"""RQ-VAE / RQ-Transformer measurements.

    # the RQ paper's sampling-speed comparison: the same prior on 8x8x4 codes vs 16x16x1 codes (random weights)
    python benchmarks/bench_rq.py throughput --preset small --batch-sizes 1,8,32 [--decode] [--append BENCHMARKS.md]
    # reconstruction of shapes tokenizer runs: PSNR and shapes-rFID, per decoded depth
    python benchmarks/bench_rq.py recon runs/rq_d4 runs/rq_d1 [--num-images 1000]
    # a text-conditional RQ-Transformer on shapes captions: does the sample show the caption's shape?
    python benchmarks/bench_rq.py text --tokenizer runs/rq_d4 --steps 3000 --out runs/rq_text

throughput: images/s of autoregressive sampling (KV cache, no top-k/p, unconditional, fp32 on CPU / bf16
autocast on GPU), optionally including decoding. The prior presets are the published measurement presets:
for 8x8x4 the spatial + depth layers are (24 + 4) and for 16x16x1 (28 + 0), i.e. the same total depth; "huge"
is the 1.4B pair (42 + 6 vs 48 + 0). Tokenizers: configs/imagenet256/tokenizer/rqvae_{8x8x4,16x16x1}.yaml.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import append_section, machine, sync  # noqa: E402
from models import build_prior, build_tokenizer  # noqa: E402
from samplers.rng import streams  # noqa: E402

# preset: (dim, heads, (spatial, depth) layers for 8x8x4, (spatial, depth) layers for 16x16x1)
PRESETS = {
    "tiny": (256, 4, (8, 2), (10, 0)),
    "small": (512, 8, (24, 4), (28, 0)),
    "medium": (1024, 16, (24, 4), (28, 0)),
    "large": (1536, 24, (24, 4), (28, 0)),
    "huge": (1536, 24, (42, 6), (48, 0)),
}
TOKENIZERS = {"8x8x4": "configs/imagenet256/tokenizer/rqvae_8x8x4.yaml",
              "16x16x1": "configs/imagenet256/tokenizer/rqvae_16x16x1.yaml"}


# ----------------------------------------------------------------------------- throughput


def build_pair(codes: str, preset: str, device):
    dim, heads, layers8, layers16 = PRESETS[preset]
    spatial, depth = layers8 if codes == "8x8x4" else layers16
    tokenizer = build_tokenizer(OmegaConf.load(ROOT / TOKENIZERS[codes]).model).to(device).eval()
    prior = build_prior(dict(target="rqtransformer", dim=dim, heads=heads, spatial_layers=spatial,
                             depth_layers=depth, dropout=0.0), tokenizer).to(device).eval()
    return tokenizer, prior


@torch.no_grad()
def images_per_s(prior, tokenizer, batch: int, repeats: int, decode: bool, device) -> float:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    with ctx:
        prior.sample({}, streams(0, range(min(batch, 4)), device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for r in range(repeats):
            tokens = prior.sample({}, streams(r + 1, range(batch), device))
            if decode:
                tokenizer.decode(tokens)
        sync()
    return batch * repeats / (time.perf_counter() - t0)


def throughput(args):
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results, params = {}, {}
    for codes in ("8x8x4", "16x16x1"):
        tokenizer, prior = build_pair(codes, args.preset, device)
        params[codes] = sum(p.numel() for p in prior.parameters()) / 1e6
        for b in batches:
            results[codes, b] = images_per_s(prior, tokenizer, b, args.repeats, args.decode, device)
            print(f"{codes} b={b}: {results[codes, b]:.3f} images/s", flush=True)
        del tokenizer, prior
    what = "AR sampling + decoding" if args.decode else "AR sampling"
    dim, heads, l8, l16 = PRESETS[args.preset]
    header = (f"RQ-Transformer preset '{args.preset}' (dim {dim}, {heads} heads): 8x8x4 with {l8[0]} + {l8[1]} "
              f"layers ({params['8x8x4']:.1f}M) vs 16x16x1 with {l16[0]} + {l16[1]} layers "
              f"({params['16x16x1']:.1f}M), 16384 codes, random weights; {what}, images/s; {machine()}")
    lines = ["| batch | 8x8x4 | 16x16x1 | speed-up |", "|---|---|---|---|"]
    for b in batches:
        a, c = results["8x8x4", b], results["16x16x1", b]
        lines.append(f"| {b} | {a:.3f} | {c:.3f} | {a / c:.2f}x |")
    print(header)
    print("\n".join(lines))
    if args.append:
        append_section(args.append, "RQ-Transformer throughput, 8x8x4 vs 16x16x1", header + "\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def recon(args):
    from data import build_dataset
    from metrics.recon import psnr
    from metrics.shapes import shapes_metrics
    from models import load_tokenizer

    for run in args.runs:
        tok = load_tokenizer(run)
        cfg = OmegaConf.load(Path(run) / "config.yaml")
        data = dict(cfg.data, random_flip=False)
        data.pop("root", None)  # the metric is on the default val split
        ds = build_dataset(data, "val")
        n = min(args.num_images, len(ds))
        x = torch.stack([ds[i][0] for i in range(n)])
        labels = torch.tensor([ds[i][1] for i in range(n)])
        codes = torch.cat([tok.encode(x[i : i + 100]) for i in range(0, n, 100)])
        depths = range(1, tok.depth + 1) if tok.kind == "rq" else [None]
        for d in depths:
            kw = {"depth": d} if d is not None else {}
            x_hat = torch.cat([tok.decode(codes[i : i + 100], **kw) for i in range(0, n, 100)])
            u8 = ((x_hat.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            m = shapes_metrics(u8, labels.numpy())
            print(f"{run} (depth {tok.depth}, decoded with {d or tok.depth} codes per cell): "
                  f"PSNR {psnr(x, x_hat).mean():.2f} dB, shapes-rFID {m['fid']:.2f}, class accuracy "
                  f"{m['accuracy']:.3f} on {n} val images", flush=True)


# ----------------------------------------------------------------------------- text-conditional shapes


def caption_tokens(split_dir: Path, cache: Path):
    """(codes LongTensor[N, 2, h, w, D] (image, mirror), captions [N] (image), labels [N]) of a shapes split,
    from the tokenizer's token cache of that split (main_tokenizer.py --cache): both are in file order."""
    import numpy as np

    from data.captions import read_shapes_captions

    records = read_shapes_captions(split_dir / "captions.jsonl")
    meta = json.loads((cache / "meta.json").read_text())
    if meta["num_items"] != len(records):
        raise SystemExit(f"cache {cache} has {meta['num_items']} items, {split_dir} {len(records)} captions")
    codes = torch.from_numpy(np.load(cache / "tokens.npy").astype("int64"))
    labels = torch.from_numpy(np.load(cache / "labels.npy"))
    if labels.tolist() != [r["label"] for r in records]:
        raise SystemExit("token cache order does not match captions.jsonl")
    return codes, [r["caption"] for r in records], labels


def text_batches(codes, captions, batch: int, seed: int):
    """Endless (codes [B, h, w, D], captions [B]) batches; a mirrored image gets its mirrored caption."""
    from data.captions import mirror_caption

    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(captions), (batch,), generator=g)
        flip = torch.randint(2, (batch,), generator=g)
        yield codes[idx, flip], [mirror_caption(captions[i]) if f else captions[i]
                                 for i, f in zip(idx.tolist(), flip.tolist())]


def shapes_caption_vocab(out_dir: Path, captions) -> tuple[Path, Path]:
    """A small character BPE (vocab.json + merges.txt) whose merges rebuild every word of the captions."""
    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = {"[PAD]": 0, "[UNK]": 1}
    merges = []
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        for s in symbols:
            vocab.setdefault(s, len(vocab))
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            symbols = [a + b] + symbols[2:]
            vocab.setdefault(a + b, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir / "vocab.json", out_dir / "merges.txt"


def train_text_prior(tokenizer, codes, captions, vocab: Path, merges: Path, steps: int, batch: int = 32,
                     lr: float = 2e-3, seed: int = 0, **model):
    """A text-conditional RQ-Transformer trained on (codes, caption) pairs -> (prior, log of (step, logs))."""
    from models import build_prior

    n_vocab = len(json.loads(Path(vocab).read_text()))
    params = dict(target="rqtransformer", dim=64, heads=4, spatial_layers=2, depth_layers=1, cond_dropout=0.1,
                  text=dict(tokenizer="bpe", vocab=str(vocab), merges=str(merges), vocab_size=n_vocab, length=12))
    params.update(model)
    torch.manual_seed(seed)
    prior = build_prior(params, tokenizer)
    opt = torch.optim.AdamW(prior.configure_optimizer_groups(0.01), lr=lr, betas=(0.9, 0.95))
    log = []
    prior.train()
    for step, (x, texts) in zip(range(steps), text_batches(codes, captions, batch, seed)):
        for group in opt.param_groups:  # cosine to 5% after a 20-step warm-up
            t = min(1.0, step / max(1, steps))
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
        out = prior(x, {"text": texts})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        log.append((step, {k: float(v.detach()) for k, v in out.items()}))
    return prior.eval(), log


@torch.no_grad()
def caption_match(prior, tokenizer, captions, labels, cfg: float, seed: int = 0, batch: int = 64) -> dict:
    """Sample one image per caption; the shapes classifier's class must be the caption's class."""
    from metrics.shapes import shapes_metrics

    images = []
    for i in range(0, len(captions), batch):
        gens = streams(seed, range(i, min(i + batch, len(captions))))
        tokens = prior.sample({"text": captions[i : i + batch]}, gens, cfg=cfg)
        x = tokenizer.decode(tokens)
        images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return shapes_metrics(torch.cat(images).numpy(), torch.as_tensor(labels).numpy())


def text(args):
    from data import shapes_root
    from models import load_tokenizer

    tok_dir = Path(args.tokenizer)
    tokenizer = load_tokenizer(tok_dir)
    cfg = OmegaConf.load(tok_dir / "config.yaml")
    root = shapes_root(dict(cfg.data))
    codes, captions, labels = caption_tokens(root / "train", tok_dir / "cache" / "train")
    out = Path(args.out)
    vocab, merges = shapes_caption_vocab(out / "text", captions)
    t0 = time.time()
    prior, log = train_text_prior(tokenizer, codes, captions, vocab, merges, args.steps, batch=args.batch_size,
                                  lr=args.lr, dim=args.dim, spatial_layers=args.spatial_layers,
                                  depth_layers=args.depth_layers)
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s; last: {log[-1][1]}")
    from data.captions import read_shapes_captions

    val = read_shapes_captions(root / "val" / "captions.jsonl")[: args.num_samples]
    for cfg_scale in args.cfg:
        m = caption_match(prior, tokenizer, [r["caption"] for r in val], [r["label"] for r in val], cfg_scale)
        print(f"cfg {cfg_scale}: caption-shape match {m['accuracy']:.3f}, shapes-FID {m['fid']:.2f} "
              f"on {len(val)} val captions")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="8x8x4 vs 16x16x1 sampling speed")
    t.add_argument("--preset", default="small", choices=sorted(PRESETS))
    t.add_argument("--batch-sizes", default="1,8,32")
    t.add_argument("--repeats", type=int, default=1)
    t.add_argument("--decode", action="store_true", help="include decoding in the time")
    t.add_argument("--append", default=None, help="append the table to this markdown file")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r = sub.add_parser("recon", help="PSNR and shapes-rFID of shapes tokenizer runs")
    r.add_argument("runs", nargs="+")
    r.add_argument("--num-images", type=int, default=1000)
    x = sub.add_parser("text", help="text-conditional RQ-Transformer on shapes captions")
    x.add_argument("--tokenizer", required=True, help="shapes rq tokenizer run with cache/train")
    x.add_argument("--out", required=True)
    x.add_argument("--steps", type=int, default=3000)
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument("--lr", type=float, default=2e-3)
    x.add_argument("--dim", type=int, default=128)
    x.add_argument("--spatial-layers", type=int, default=3)
    x.add_argument("--depth-layers", type=int, default=1)
    x.add_argument("--num-samples", type=int, default=256)
    x.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    args = p.parse_args()
    {"throughput": throughput, "recon": recon, "text": text}[args.cmd](args)


if __name__ == "__main__":
    main()
