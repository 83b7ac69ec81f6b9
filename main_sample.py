"""Generate N images from a prior run directory: PNG shards, one ADM-format .npz, a grid, a decoding GIF.

    python main_sample.py --prior runs/gpt --class 3 --num-samples 16 --out samples/demo --gif
    torchrun --nproc_per_node=8 main_sample.py --prior runs/gpt_b --num-samples 50000 --out samples/gpt_b \
        sampling.cfg=2.0 sampling.top_k=0

Sample i uses its own random stream derived from (seed, i), so the images do not depend on the number of
processes or the batch size. Re-running the same command skips the indices already written. Labels of a
class-conditional prior are balanced: sample i has class i mod num_classes (N / num_classes per class).
Outputs: OUT/images/{i:06d}.png, OUT.npz (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels), OUT/grid.png,
OUT/decoding.gif (with --gif).

Inpainting (priors with ``supports_inpainting``, e.g. sundae): every sample completes the same image,

    python main_sample.py --prior runs/sundae --num-samples 16 --out samples/fill --inpaint img.png --mask mask.png

mask: white = known pixel, black = hole. A token cell is known only if its whole pixel patch is known; known
cells keep the image's codes, the others are generated. Also writes OUT/masked.png (the input, holes grey).
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from engine import dist
from engine.cli import run_main
from engine.errors import TesseraError
from samplers.logits import check_sampling_kwargs
from samplers.rng import sample_seed, streams


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (the rounding the ADM tooling uses)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def labels_for(indices, num_classes: int, fixed_class):
    if fixed_class is not None:
        return [int(fixed_class)] * len(indices)
    if num_classes:
        return [i % num_classes for i in indices]
    return None


def read_caption_records(path) -> list[dict]:
    """--captions: a .txt (one caption a line) or a .jsonl of {"caption": ..., optional "label": ...}."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines] if str(path).endswith(".jsonl") else [{"caption": c} for c in lines]
    if not records:
        raise TesseraError(f"no captions in {path}")
    return records


def load_captions(path, n):
    """Caption of sample i: line i mod the number of lines."""
    records = read_caption_records(path)
    return [records[i % len(records)]["caption"] for i in range(n)]


def caption_labels(path, n):
    """Labels of the captions of samples 0..n-1 when every record has one (shapes captions.jsonl), else None;
    they go to the .npz as arr_1, so compute_fid.py --shapes reports how often a sample shows its caption."""
    records = read_caption_records(path)
    if not all("label" in r for r in records):
        return None
    return [int(records[i % len(records)]["label"]) for i in range(n)]


class Generator:
    """Wraps (prior, tokenizer, sampling settings, optional rejection classifier) for batches of indices."""

    def __init__(self, prior, tokenizer, sampling: dict, seed: int, device, classifier=None):
        self.prior, self.tokenizer, self.seed, self.device = prior, tokenizer, seed, device
        self.rejection_n = int(sampling.pop("rejection_n", 1))
        self.sampling = sampling
        self.classifier = classifier
        self.known = None  # inpainting: {"known_tokens": [1, ...], "known_mask": [1, h, w]}

    def known_for(self, n: int) -> dict:
        """The inpainting keyword arguments for a batch of n rows ({} when not inpainting)."""
        if self.known is None:
            return {}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.known.items()}

    def cond(self, labels, captions, repeat=1):
        cond = {}
        if labels is not None:
            cond["class"] = torch.tensor(labels, device=self.device).repeat_interleave(repeat)
        if captions is not None:
            cond["text"] = [c for c in captions for _ in range(repeat)]
        return cond

    @torch.no_grad()
    def images(self, indices, labels=None, captions=None, trace=False):
        """-> images [B, 3, H, W] in [-1, 1] (and trace states when asked)."""
        if self.rejection_n <= 1:
            gens = streams(self.seed, indices, self.device)
            out = self.prior.sample(self.cond(labels, captions), gens, trace=trace, **self.sampling,
                                    **self.known_for(len(indices)))
            tokens, states = out if trace else (out, None)
            x = self.tokenizer.decode(tokens)
            return (x, states) if trace else x
        # best-of-n: candidate j of sample i draws from a stream seeded by (seed of sample i, j)
        n = self.rejection_n
        gens = [g for i in indices for g in streams(sample_seed(self.seed, i), range(n), self.device)]
        tokens = self.prior.sample(self.cond(labels, captions, repeat=n), gens, **self.sampling,
                                   **self.known_for(len(gens)))
        x = self.tokenizer.decode(tokens)
        probs = self.classifier(x).reshape(len(indices), n, -1)
        x = x.reshape(len(indices), n, *x.shape[1:])
        target = torch.tensor(labels, device=probs.device)
        best = probs[torch.arange(len(indices)), :, target].argmax(dim=1)
        x = x[torch.arange(len(indices)), best]
        return (x, None) if trace else x


def main():
    import argparse

    p = argparse.ArgumentParser(description="Sample images from a tessera prior run directory.")
    p.add_argument("--prior", required=True, help="prior run directory")
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--out", required=True, help="output folder; the .npz is written beside it as OUT.npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--class", type=int, default=None, dest="fixed_class", help="sample only this class")
    p.add_argument("--captions", default=None, help="text priors: a .txt (one per line) or captions .jsonl")
    p.add_argument("--gif", action="store_true", help="also write OUT/decoding.gif of the first batch")
    p.add_argument("--classifier", default=None,
                   help="rejection classifier: 'shapes' or 'torchvision:ARCH:WEIGHTS.pth' (with sampling.rejection_n)")
    p.add_argument("--inpaint", default=None, metavar="IMAGE", help="complete this image (needs --mask)")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = known, black = hole to fill")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="sampling.* overrides, e.g. sampling.cfg=2.0 sampling.top_k=0")
    args = p.parse_args()
    if args.num_samples <= 0:
        raise TesseraError("--num-samples must be positive")
    bad = [o for o in args.overrides if not o.startswith("sampling.") or "=" not in o]
    if bad:
        raise TesseraError(f"override '{bad[0]}' is not a sampling.KEY=VALUE override")
    if (args.inpaint is None) != (args.mask is None):
        raise TesseraError("--inpaint IMAGE and --mask MASK go together; pass both")

    env = dist.setup(args.local_rank, args.device)
    try:
        run(args, env)
    finally:
        dist.cleanup()


def run(args, env):
    from models import load_prior
    from samplers.rejection import load_classifier

    prior, tokenizer, cfg = load_prior(args.prior, env.device, use_ema=not args.no_ema)
    overrides = OmegaConf.from_dotlist(args.overrides).get("sampling", {})
    sampling = OmegaConf.to_container(OmegaConf.merge(cfg.get("sampling", {}), overrides))
    sampling = check_sampling_kwargs(sampling, getattr(prior, "sampling_defaults", None))
    num_classes = int(cfg.get("num_classes") or 0)
    if args.fixed_class is not None and not 0 <= args.fixed_class < max(num_classes, 1):
        raise TesseraError(f"--class {args.fixed_class} is out of range: the prior has {num_classes} classes")
    if num_classes == 0 and args.fixed_class is not None:
        raise TesseraError("--class given but the prior is unconditional")
    classifier = None
    if int(sampling.get("rejection_n", 1)) > 1:
        if num_classes == 0:
            raise TesseraError("sampling.rejection_n > 1 needs a class-conditional prior")
        classifier = load_classifier(args.classifier or ("shapes" if cfg.data.name == "shapes" else None), cfg,
                                     env.device)
    gen = Generator(prior, tokenizer, sampling, args.seed, env.device, classifier)
    if args.inpaint is not None:
        gen.known = inpaint_setup(args, prior, tokenizer, cfg, env)

    out = Path(args.out)
    img_dir = out / "images"
    if env.is_main:
        img_dir.mkdir(parents=True, exist_ok=True)
    done = None
    if env.is_main:
        done = {int(f.stem) for f in img_dir.glob("[0-9]*.png") if f.stem.isdigit() and int(f.stem) < args.num_samples}
    done = dist.broadcast_object(done)
    todo = [i for i in range(args.num_samples) if i not in done][env.rank :: env.world_size]
    captions = load_captions(args.captions, args.num_samples) if args.captions else None
    if env.is_main and done:
        print(f"resuming: {len(done)} of {args.num_samples} images already in {img_dir}")

    pbar = tqdm(total=len(todo) * env.world_size, disable=not env.is_main, unit="img", dynamic_ncols=True)
    t0, made = time.time(), 0
    for start in range(0, len(todo), args.batch_size):
        idx = todo[start : start + args.batch_size]
        labels = labels_for(idx, num_classes, args.fixed_class)
        caps = [captions[i] for i in idx] if captions else None
        x = gen.images(idx, labels, caps)
        for i, arr in zip(idx, to_uint8(x)):
            save_png(arr, img_dir / f"{i:06d}.png")
        made += len(idx)
        pbar.update(len(idx) * env.world_size)
        pbar.set_postfix(img_per_s=f"{made * env.world_size / (time.time() - t0):.2f}")
    pbar.close()
    dist.barrier()
    if env.is_main:
        finish(args, out, img_dir, num_classes, gen)


def inpaint_setup(args, prior, tokenizer, cfg, env) -> dict:
    """Encode --inpaint / --mask into the prior's known codes; the main process writes OUT/masked.png."""
    from samplers.inpaint import inpaint_inputs

    if not getattr(prior, "supports_inpainting", False):
        raise TesseraError(f"prior '{cfg.model.target}' cannot inpaint; use a prior that supports it (sundae)")
    known = inpaint_inputs(tokenizer, args.inpaint, args.mask, env.device)
    if env.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        masked = torch.where(known["known_pixels"][:, None], known["image"], torch.zeros_like(known["image"]))
        save_png(to_uint8(masked)[0], Path(args.out) / "masked.png")
        print(f"inpainting: {int(known['known_mask'].sum())} of {known['known_mask'].numel()} token cells known")
    return {"known_tokens": known["known_tokens"], "known_mask": known["known_mask"]}


def finish(args, out: Path, img_dir: Path, num_classes: int, gen: Generator) -> None:
    files = [img_dir / f"{i:06d}.png" for i in range(args.num_samples)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise TesseraError(f"{len(missing)} samples missing (first {missing[0]}); re-run the same command")
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    npz = out.with_suffix(".npz") if out.suffix != ".npz" else out
    payload = {"arr_0": arr}
    labels = labels_for(range(args.num_samples), num_classes, args.fixed_class)
    if labels is None and args.captions:
        labels = caption_labels(args.captions, args.num_samples)
    if labels is not None:
        payload["arr_1"] = np.asarray(labels, dtype=np.int64)
    tmp = npz.with_name(f".{npz.stem}.tmp.npz")
    np.savez(tmp, **payload)
    os.replace(tmp, npz)
    from torchvision.utils import save_image

    grid = torch.from_numpy(arr[:64]).permute(0, 3, 1, 2).float() / 255.0
    save_image(grid, out / "grid.png", nrow=int(np.ceil(np.sqrt(len(grid)))), padding=1)
    print(f"wrote {npz} ({arr.shape[0]} images {arr.shape[1]}x{arr.shape[2]}) and {out / 'grid.png'}")
    if args.gif:
        from samplers.trace import decoding_gif

        k = min(16, args.num_samples)
        idx = list(range(k))
        labels = labels_for(idx, num_classes, args.fixed_class)
        gens = streams(args.seed, idx, gen.device)
        caps = load_captions(args.captions, k) if args.captions else None
        tokens, states = gen.prior.sample(gen.cond(labels, caps), gens, trace=True, **gen.sampling,
                                          **gen.known_for(k))
        decoding_gif(states, gen.tokenizer.decode, out / "decoding.gif")
        print(f"wrote {out / 'decoding.gif'} ({len(states)} frames)")


if __name__ == "__main__":
    run_main(main)
