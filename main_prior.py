"""Train any registered prior on a frozen tokenizer run directory.

    python main_prior.py --config configs/shapes/prior/gpt.yaml --tokenizer runs/vq --run-dir runs/gpt
    torchrun --nproc_per_node=8 main_prior.py --config configs/imagenet256/prior/gpt_b.yaml \
        --tokenizer runs/vqgan --run-dir runs/gpt_b train.cache=runs/vqgan/cache/train

Tokens come from the token cache when ``train.cache`` is set (written by main_tokenizer.py --cache;
flips are precomputed variants), otherwise the tokenizer encodes each batch on the fly. With
``data.captions`` set (a text prior) the items are (tokens, caption) pairs, looked up in the cache by
image file, and the condition is ``{"text": captions}``.
"""

from pathlib import Path

import torch

from engine import dist
from engine.cli import base_parser, resolve_run_config, run_main, write_run_config
from engine.config import LOG_DEFAULTS, TRAIN_DEFAULTS, data_defaults
from engine.errors import TesseraError
from engine.seed import seed_everything
from engine.train_loop import Trainer
from samplers.logits import check_sampling_kwargs

PRIOR_TRAIN_DEFAULTS = dict(TRAIN_DEFAULTS, betas=[0.9, 0.95], weight_decay=0.05)


def sections() -> dict:
    from samplers.logits import SAMPLING_DEFAULTS

    return {"model": {}, "train": PRIOR_TRAIN_DEFAULTS, "data": data_defaults(), "log": LOG_DEFAULTS,
            "sampling": dict(SAMPLING_DEFAULTS), "tokenizer": None, "num_classes": None}


def condition(prior, y) -> dict:
    """The prior's condition dict for a batch of labels (or captions, for text priors)."""
    if "class" in prior.conditions and getattr(prior, "num_classes", 0):
        return {"class": y}
    if "text" in prior.conditions and isinstance(y, (list, tuple)):
        return {"text": list(y)}
    return {}


class PriorTask:
    def __init__(self, prior, tokenizer, from_cache: bool):
        self.prior, self.tokenizer, self.from_cache = prior, tokenizer, from_cache
        self.modules = {"model": prior}

    def phases(self, step):
        return [("prior", ["model"])]

    def param_groups(self, phase, name, weight_decay):
        module = self.modules[name]
        if hasattr(module, "configure_optimizer_groups"):
            return module.configure_optimizer_groups(weight_decay)
        from engine.train_loop import default_param_groups

        return default_param_groups(module, weight_decay)

    def loss(self, phase, micro, step, wrapped):
        x, y = micro
        if self.from_cache:
            tokens = x
            if hasattr(self.tokenizer, "cache_to_tokens"):  # e.g. sample a KL posterior from cached moments
                tokens = self.tokenizer.cache_to_tokens(tokens)
        else:
            with torch.no_grad():
                tokens = self.tokenizer.encode(x)
        out = wrapped["model"](tokens, condition(self.prior, y))
        loss = out["loss"]
        return loss, {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


def num_classes_of(cfg, dataset) -> int:
    if cfg.data.num_classes is not None:
        return int(cfg.data.num_classes)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else 0


def train(args, cfg, env):
    from data import build_dataset
    from data.cache import TokenCacheDataset
    from engine.batches import step_loader
    from models import build_prior, load_tokenizer

    tok_dir = Path(args.tokenizer or cfg.tokenizer or "")
    if not str(tok_dir) or str(tok_dir) == ".":
        raise TesseraError("no tokenizer: pass --tokenizer RUN_DIR (a tokenizer run directory)")
    tokenizer = load_tokenizer(tok_dir, env.device)
    if int(cfg.data.resolution) != getattr(tokenizer, "resolution", cfg.data.resolution):
        raise TesseraError(f"data.resolution={cfg.data.resolution} but the tokenizer {tok_dir} works at "
                           f"{tokenizer.resolution} px; set data.resolution={tokenizer.resolution}")
    data_cfg = dict(cfg.data, random_flip=False)
    images = build_dataset(data_cfg, "train")
    from_cache = cfg.train.cache is not None
    dataset = TokenCacheDataset(cfg.train.cache, tokenizer) if from_cache else images
    if from_cache and len(dataset) != len(images):
        raise TesseraError(f"token cache {cfg.train.cache} has {len(dataset)} items, the dataset {len(images)}; "
                           f"re-run main_tokenizer.py --cache")
    with_captions = cfg.data.get("captions") is not None  # text prior: (tokens, caption) pairs, no classes
    if with_captions:
        from data import caption_training_set

        dataset = caption_training_set(cfg.data, images, dataset if from_cache else None)
    cfg.tokenizer = str(tok_dir.resolve())
    cfg.num_classes = 0 if with_captions else num_classes_of(cfg, images)
    seed_everything(int(cfg.train.seed))  # the same initial weights on every process and every run
    prior = build_prior(cfg.model, tokenizer, num_classes=cfg.num_classes)
    if with_captions and "text" not in prior.conditions:
        raise TesseraError(f"data.captions is set but prior '{cfg.model.target}' takes no text; unset data.captions")
    cfg.sampling = check_sampling_kwargs(dict(cfg.sampling), getattr(prior, "sampling_defaults", None))
    if cfg.train.grad_checkpointing and hasattr(prior, "set_grad_checkpointing"):
        prior.set_grad_checkpointing(True)
    write_run_config(cfg, args.run_dir, env.is_main)
    trainer = Trainer(PriorTask(prior, tokenizer, from_cache), cfg, Path(args.run_dir), env)
    t = cfg.train
    loader = step_loader(dataset, global_batch=int(t.batch_size), grad_accum=int(t.grad_accum), rank=env.rank,
                         world_size=env.world_size, seed=int(t.seed),
                         flip=bool(cfg.data.random_flip) and not with_captions,  # caption sets hold their flips
                         start_step=trainer.step, max_steps=int(t.max_steps), num_workers=int(t.num_workers),
                         variants=from_cache and not with_captions)
    if env.is_main:
        n_params = sum(p.numel() for p in prior.parameters())
        print(f"prior {cfg.model.target}: {n_params / 1e6:.2f}M parameters, tokens {tuple(tokenizer.token_shape)}, "
              f"{cfg.num_classes} classes, {'cached' if from_cache else 'on-the-fly'} tokens")
    trainer.fit(loader)
    out = trainer.export("model")
    if env.is_main:
        print(f"done: step {trainer.step}; weights in {out}")


def main():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=None, help="tokenizer run directory (frozen)")
    args = p.parse_args()
    cfg = resolve_run_config(args, sections(), training=True)
    env = dist.setup(args.local_rank, args.device)
    try:
        train(args, cfg, env)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_main(main)
