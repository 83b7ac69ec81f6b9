"""Train, evaluate, and cache tokens of a tokenizer (VQ, RQ or KL).

    python main_tokenizer.py --config configs/shapes/tokenizer/vq.yaml --run-dir runs/vq train.max_steps=2000
    torchrun --nproc_per_node=4 main_tokenizer.py \
        --config configs/imagenet256/tokenizer/vqgan_f16_16384.yaml --run-dir runs/vqgan
    python main_tokenizer.py --eval --run-dir runs/vq          # PSNR, SSIM, LPIPS, codebook usage (+ rFID)
    python main_tokenizer.py --reconstruct --run-dir runs/vq   # original | reconstruction grid PNG
    python main_tokenizer.py --cache --run-dir runs/vq         # token cache (with flips) for prior training
    python main_tokenizer.py --remap --run-dir runs/vq         # codes_used.npy (needs the cache) for model.remap
    python main_tokenizer.py --compute-scale --run-dir runs/kl # KL: scale_factor = 1/std of sampled latents
"""

import collections
import json
from pathlib import Path

import torch

from engine import dist
from engine.cli import base_parser, resolve_run_config, run_main, signature_defaults, write_run_config
from engine.config import LOG_DEFAULTS, TRAIN_DEFAULTS, data_defaults
from engine.errors import TesseraError
from engine.seed import seed_everything
from engine.train_loop import Trainer
from models.tokenizers.losses import TokenizerLoss

TOKENIZER_TRAIN_DEFAULTS = dict(TRAIN_DEFAULTS, betas=[0.5, 0.9], lr=1e-4)


def sections() -> dict:
    return {"model": {}, "loss": signature_defaults(TokenizerLoss), "train": TOKENIZER_TRAIN_DEFAULTS,
            "data": data_defaults(), "log": LOG_DEFAULTS}


class TokenizerTask:
    """Autoencoder phase ("ae") and, once the discriminator is on, the discriminator phase ("disc")."""

    def __init__(self, tokenizer, loss: TokenizerLoss):
        self.tokenizer, self.loss_fn = tokenizer, loss
        self.modules = {"model": tokenizer}
        if loss.discriminator is not None:
            self.modules["disc"] = loss.discriminator
        self.loss_fn.perceptual = loss.perceptual  # frozen, not saved with the model
        self._fakes = collections.deque()

    def phases(self, step):
        out = [("ae", ["model"])]
        if "disc" in self.modules and (step is None or self.loss_fn.disc_active(step)):
            out.append(("disc", ["disc"]))
        return out

    def loss(self, phase, micro, step, wrapped):
        x = micro[0]
        if phase == "ae":
            x_hat, q = wrapped["model"](x)
            disc = self.modules.get("disc")
            if disc is not None:
                disc.requires_grad_(False)
            loss, logs = self.loss_fn.generator_loss(x, x_hat, q.loss, step, self.tokenizer.last_layer, disc)
            if disc is not None:
                disc.requires_grad_(True)
                if self.loss_fn.disc_active(step):
                    self._fakes.append(x_hat.detach())
            logs.update({k: v for k, v in q.logs.items()})
            return loss, logs
        return self.loss_fn.discriminator_loss(wrapped["disc"], x, self._fakes.popleft())


def build_data(cfg, split: str):
    from data import build_dataset

    data_cfg = dict(cfg.data)
    data_cfg["random_flip"] = False  # flips are drawn per stream row by engine.batches
    return build_dataset(data_cfg, split)


def check_resolution(cfg, tokenizer) -> None:
    if int(cfg.data.resolution) != tokenizer.resolution:
        raise TesseraError(
            f"data.resolution={cfg.data.resolution} but the tokenizer is built for {tokenizer.resolution} px; "
            f"set both to the same size"
        )


def train(args, cfg, env):
    from engine.batches import step_loader
    from models import build_tokenizer

    seed_everything(int(cfg.train.seed))  # the same initial weights on every process and every run
    tokenizer = build_tokenizer(cfg.model)
    check_resolution(cfg, tokenizer)
    dataset = build_data(cfg, "train")
    if cfg.train.grad_checkpointing:
        tokenizer.set_grad_checkpointing(True)
    loss = TokenizerLoss(**cfg.loss)
    write_run_config(cfg, args.run_dir, env.is_main)
    trainer = Trainer(TokenizerTask(tokenizer, loss), cfg, Path(args.run_dir), env)
    t = cfg.train
    loader = step_loader(dataset, global_batch=int(t.batch_size), grad_accum=int(t.grad_accum), rank=env.rank,
                         world_size=env.world_size, seed=int(t.seed), flip=bool(cfg.data.random_flip),
                         start_step=trainer.step, max_steps=int(t.max_steps), num_workers=int(t.num_workers))
    trainer.fit(loader)
    out = trainer.export("model")
    if env.is_main:
        print(f"done: step {trainer.step}; weights in {out}")


def _val_loader(cfg, args, env):
    dataset = build_data(cfg, args.split)
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    indices = list(range(env.rank, n, env.world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=False), n


@torch.no_grad()
def evaluate(args, cfg, env):
    from metrics.recon import ReconMetrics
    from models import load_tokenizer

    tok = load_tokenizer(args.run_dir, env.device)
    metrics = ReconMetrics(lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
                           device=env.device)
    loader, n = _val_loader(cfg, args, env)
    counts = torch.zeros(tok.codebook_size, dtype=torch.float64) if hasattr(tok, "codebook_size") else None
    for x, _ in loader:
        x = x.to(env.device)
        tokens = tok.encode(x)
        metrics.update(x, tok.decode(tokens))
        if counts is not None:
            counts += torch.bincount(tokens.flatten().cpu(), minlength=tok.codebook_size).double()
    results = metrics.compute()
    if counts is not None:
        dist.all_reduce_sum(counts)
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
        results.update(codebook_usage=float((counts > 0).double().mean()), perplexity=2**entropy,
                       entropy_bits=entropy)
    results["num_images"] = n
    if env.is_main:
        for k, v in results.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
        out = Path(args.run_dir) / f"eval_{args.split}.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


@torch.no_grad()
def reconstruct(args, cfg, env):
    from torchvision.utils import save_image

    from models import load_tokenizer

    tok = load_tokenizer(args.run_dir, env.device)
    dataset = build_data(cfg, args.split)
    n = min(args.num_images or 32, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)]).to(env.device)
    x_hat = tok.decode(tok.encode(x))
    rows = []
    for i in range(0, n, 8):  # pairs of rows: originals, then their reconstructions
        rows += [x[i : i + 8], x_hat[i : i + 8]]
    out = Path(args.out or Path(args.run_dir) / "samples" / "reconstruction.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows) * 0.5 + 0.5, out, nrow=8, padding=1)
    print(f"wrote {out} (odd rows: originals, even rows: reconstructions)")


def cache(args, cfg, env):
    from data.cache import write_token_cache
    from models import load_tokenizer

    tok = load_tokenizer(args.run_dir, env.device)
    for split in args.cache_splits.split(","):
        path = write_token_cache(tok, build_data(cfg, split), Path(args.run_dir) / "cache" / split, env,
                                 batch_size=args.batch_size)
        if env.is_main:
            print(f"wrote {path}")


def remap(args):
    from data.cache import write_codes_used

    run = Path(args.run_dir)
    path, count = write_codes_used(run / "cache" / "train", run / "codes_used.npy")
    print(f"wrote {path}: {count} codes used; train a prior on them with model.remap={path.resolve()}")


@torch.no_grad()
def compute_scale(args, cfg, env):
    """scale_factor = 1 / std of posterior samples over the training split (all of it, or --num-images).

    The value is written into the ``scale_factor`` buffer of the run's weights (checkpoints/last.pt, raw and
    EMA, and model.safetensors), which is what load_tokenizer reads, and recorded in RUN_DIR/scale_factor.json.
    Periodic checkpoints (step_*.pt) are left as they were. Priors trained before a new scale was computed
    must be retrained: their tokens were scaled by the old value.
    """
    from models import load_tokenizer
    from models.tokenizers.kl import DiagonalGaussian

    tok = load_tokenizer(args.run_dir, env.device)
    if getattr(tok, "scale_factor", None) is None or not hasattr(tok, "cache_encode"):
        raise TesseraError(f"--compute-scale applies to tokenizers with a latent scale_factor (kind kl); "
                           f"{args.run_dir} holds a '{tok.kind}' tokenizer")
    dataset = build_data(cfg, "train")
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, list(range(env.rank, n, env.world_size)))
    gen = torch.Generator(device=env.device).manual_seed(int(cfg.train.seed) + env.rank)
    stats = torch.zeros(3, dtype=torch.float64, device=env.device)  # count, sum, sum of squares
    for x, _ in torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=False):
        z = DiagonalGaussian(tok.cache_encode(x.to(env.device))).sample(gen).double()
        stats += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device), z.sum(),
                              z.pow(2).sum()])
    dist.all_reduce_sum(stats)
    count, total, squares = stats.tolist()
    mean = total / count
    std = max(squares / count - mean**2, 0.0) ** 0.5
    if not std > 0:
        raise TesseraError(f"the latents of {args.run_dir} have zero spread; is the tokenizer trained?")
    scale = 1.0 / std
    if env.is_main:
        written = store_scale_factor(Path(args.run_dir), scale)
        record = {"scale_factor": scale, "latent_mean": mean, "latent_std": std, "num_images": n}
        (Path(args.run_dir) / "scale_factor.json").write_text(json.dumps(record, indent=2))
        print(f"scale_factor = 1 / {std:.6f} = {scale:.6f} (latent mean {mean:.4f}, {n} images); "
              f"written to {', '.join(written)}")
    dist.barrier()


def store_scale_factor(run_dir: Path, scale: float) -> list[str]:
    """Set the ``scale_factor`` entry of every weights file load_tokenizer may read (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.checkpoint import atomic_save, export_safetensors, load

    value = torch.tensor(float(scale))
    written = []
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        state = load(ckpt)
        for section in ("modules", "ema"):
            if "model" in state.get(section, {}):
                state[section]["model"]["scale_factor"] = value.clone()
        atomic_save(state, ckpt)
        written.append(str(ckpt))
    st = run_dir / "model.safetensors"
    if st.is_file():
        with safe_open(str(st), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(st))
        tensors["scale_factor"] = value.clone()
        export_safetensors(tensors, st, metadata)
        written.append(str(st))
    if not written:
        raise TesseraError(f"no weights in {run_dir} to store the scale factor in")
    return written


def main():
    p = base_parser(__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true", help="reconstruction metrics on --split")
    mode.add_argument("--reconstruct", action="store_true", help="write an original | reconstruction grid")
    mode.add_argument("--cache", action="store_true", help="encode the training set (and its flips) to tokens")
    mode.add_argument("--compute-scale", action="store_true",
                      help="KL: set scale_factor to 1/std of sampled latents over the training set")
    mode.add_argument("--remap", action="store_true",
                      help="write RUN_DIR/codes_used.npy: the codes RUN_DIR/cache/train uses (for model.remap)")
    p.add_argument("--split", default="val")
    p.add_argument("--cache-splits", default="train")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--inception-weights", default=None, help="pt_inception weights file, for rFID")
    p.add_argument("--lpips-weights", default=None, help="torchvision VGG16 weights file, for LPIPS")
    args = p.parse_args()
    training = not (args.eval or args.reconstruct or args.cache or args.remap or args.compute_scale)
    cfg = resolve_run_config(args, sections(), training)
    env = dist.setup(args.local_rank, args.device)
    try:
        if training:
            train(args, cfg, env)
        elif args.eval:
            evaluate(args, cfg, env)
        elif args.reconstruct:
            if env.is_main:
                reconstruct(args, cfg, env)
        elif args.remap:
            if env.is_main:
                remap(args)
        elif args.compute_scale:
            compute_scale(args, cfg, env)
        else:
            cache(args, cfg, env)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    if not Path(__file__).with_name("engine").is_dir():
        raise TesseraError("run main_tokenizer.py from the tessera repository root")
    run_main(main)
