"""The training loop every entry point shares.

A *task* says what trains and how its losses are computed; the loop owns everything else: DDP,
autocast, gradient accumulation, clipping, the LR schedule, EMA, checkpoints (atomic, resumable),
logging, and stopping on a non-finite loss.

Task interface::

    task.modules        dict name -> nn.Module; every trainable module (saved in checkpoints)
    task.phases(step)   list of (phase name, module names it updates); one optimizer per phase name
                        (a GAN has "ae" and "disc"); phases inactive at this step are left out
    task.param_groups(phase, weight_decay) -> list of optimizer param groups (optional)
    task.phase_lr(phase) -> float multiplier on train.lr (optional)
    task.loss(phase, micro, step, wrapped) -> (loss, logs)
        micro: (x, y) micro-batch on the device; wrapped: name -> DDP-wrapped module (or the module)
    task.after_step(step) (optional)
"""

import json
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from engine import dist
from engine.checkpoint import atomic_save, export_safetensors, load
from engine.ema import EMA
from engine.errors import TesseraError
from engine.seed import rng_state, seed_everything, set_rng_state


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr, then constant or cosine down to lr * min_lr_ratio at max_steps."""
    base = float(cfg.lr)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        floor = base * cfg.min_lr_ratio
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise TesseraError(f"train.schedule='{cfg.schedule}' is not one of: constant, cosine")


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPUs that support it, fp16 when asked, nothing on CPU (fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    if precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.float16)
    raise TesseraError(f"train.precision='{precision}' is not one of: bf16, fp16, fp32")


def default_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2) only; none on biases, norms, or 1-d parameters."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class JsonlLog:
    def __init__(self, path: Path, wandb_cfg=None, config=None):
        self.path = path
        self.wandb = None
        if wandb_cfg is not None and wandb_cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise TesseraError("log.wandb is set but wandb is not installed: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_cfg.wandb, entity=wandb_cfg.wandb_entity, name=wandb_cfg.name,
                                    config=config, resume="allow")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


class Trainer:
    def __init__(self, task, cfg, run_dir: Path, env: dist.DistEnv, extra_state: dict | None = None):
        self.task, self.cfg, self.tcfg, self.env = task, cfg, cfg.train, env
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.extra_state = extra_state or {}
        self.step = 0
        seed_everything(int(self.tcfg.seed) + env.rank)
        for m in task.modules.values():
            m.to(env.device)
        self.wrapped = {
            name: DDP(m, device_ids=[env.local_rank] if env.device.type == "cuda" else None, broadcast_buffers=False)
            if env.distributed and any(p.requires_grad for p in m.parameters()) else m
            for name, m in task.modules.items()
        }
        self.optimizers = {}
        for phase, names in task.phases(None):
            groups = []
            for n in names:
                if hasattr(task, "param_groups"):
                    groups += task.param_groups(phase, n, float(self.tcfg.weight_decay))
                else:
                    groups += default_param_groups(task.modules[n], float(self.tcfg.weight_decay))
            fused = bool(self.tcfg.fused_adam) and env.device.type == "cuda"
            self.optimizers[phase] = torch.optim.AdamW(
                groups, lr=float(self.tcfg.lr), betas=tuple(self.tcfg.betas), eps=float(self.tcfg.eps), fused=fused
            )
        self.scaler = torch.amp.GradScaler("cuda", enabled=env.device.type == "cuda" and self.tcfg.precision == "fp16")
        self.emas = {n: EMA(m, float(self.tcfg.ema)) for n, m in task.modules.items()
                     if self.tcfg.ema > 0 and getattr(m, "use_ema", True)}
        self.log = JsonlLog(self.run_dir / "log.jsonl", cfg.get("log"), None) if env.is_main else None
        self._resume()

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        rngs = dist.all_gather_object(rng_state())
        return {
            "step": self.step,
            "modules": {n: m.state_dict() for n, m in self.task.modules.items()},
            "ema": {n: e.state_dict() for n, e in self.emas.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "world_size": self.env.world_size,
            **self.extra_state,
        }

    def save(self) -> None:
        state = self.state()  # collective: every rank takes part
        if self.env.is_main:
            atomic_save(state, self.ckpt_dir / "last.pt")
            if self.tcfg.keep_every and self.step % self.tcfg.keep_every == 0:
                atomic_save(state, self.ckpt_dir / f"step_{self.step:07d}.pt")

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return
        state = load(path, map_location="cpu")
        for n, m in self.task.modules.items():
            m.load_state_dict(state["modules"][n])
        for n, e in self.emas.items():
            if n in state["ema"]:
                e.load_state_dict(state["ema"][n])
        for n, o in self.optimizers.items():
            if n in state["optimizers"]:
                o.load_state_dict(state["optimizers"][n])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state["world_size"] == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}")

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, loader) -> None:
        t = self.tcfg
        pbar = tqdm(total=int(t.max_steps), initial=self.step, disable=not self.env.is_main, dynamic_ncols=True)
        try:
            self._fit(loader, pbar)
        finally:
            pbar.close()  # so an error message starts on a line of its own

    def _fit(self, loader, pbar) -> None:
        t = self.tcfg
        device = self.env.device
        accum = int(t.grad_accum)
        micro_iter = iter(loader)
        sums, count, t0, images = {}, 0, time.time(), 0
        while self.step < t.max_steps:
            micros = [next(micro_iter) for _ in range(accum)]
            micros = [tuple(v.to(device, non_blocking=True) if torch.is_tensor(v) else v for v in mb) for mb in micros]
            lr = lr_at(self.step, t)
            step_logs, bad = {}, None
            for phase, names in self.task.phases(self.step):
                opt = self.optimizers[phase]
                scale = self.task.phase_lr(phase) if hasattr(self.task, "phase_lr") else 1.0
                for g in opt.param_groups:
                    g["lr"] = lr * scale
                opt.zero_grad(set_to_none=True)
                for i, mb in enumerate(micros):
                    with ExitStack() as stack:
                        if i < accum - 1:
                            for n in names:
                                if isinstance(self.wrapped[n], DDP):
                                    stack.enter_context(self.wrapped[n].no_sync())
                        with autocast_for(device, t.precision):
                            loss, logs = self.task.loss(phase, mb, self.step, self.wrapped)
                        if not torch.isfinite(loss.detach()).all():
                            bad = f"{phase} loss"
                        self.scaler.scale(loss / accum).backward()
                    for k, v in logs.items():
                        step_logs[k] = step_logs.get(k, 0.0) + float(v) / accum
                if dist.any_true(bad is not None, device):
                    raise TesseraError(
                        f"non-finite {bad or 'loss'} at step {self.step}; stopped, {self.ckpt_dir / 'last.pt'} "
                        f"holds the last good state (lower train.lr or enable train.grad_clip)"
                    )
                if t.grad_clip > 0:
                    self.scaler.unscale_(opt)
                    params = [p for n in names for p in self.task.modules[n].parameters() if p.grad is not None]
                    step_logs[f"grad_norm_{phase}"] = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
                self.scaler.step(opt)
                self.scaler.update()
            if hasattr(self.task, "after_step"):
                self.task.after_step(self.step)
            for n, e in self.emas.items():
                e.update(self.task.modules[n])
            self.step += 1
            images += sum(len(mb[0]) for mb in micros) * self.env.world_size
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            pbar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self._log(sums, count, lr, images / max(1e-9, time.time() - t0), pbar)
                sums, count, t0, images = {}, 0, time.time(), 0
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.save()

    def _log(self, sums, count, lr, ips, pbar) -> None:
        keys = sorted(sums)
        vals = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64)
        dist.all_reduce_mean(vals)
        record = {"step": self.step, "lr": lr, "images_per_s": round(ips, 2)}
        record.update({k: float(v) for k, v in zip(keys, vals)})
        if self.env.is_main:
            self.log.write(record)
            pbar.set_postfix({k: f"{record[k]:.4g}" for k in keys[:4]})

    def export(self, name: str = "model") -> Path | None:
        """Write RUN_DIR/<name>.safetensors with the EMA weights when kept, else the raw weights."""
        if not self.env.is_main:
            return None
        module = self.task.modules[name]
        state = self.emas[name].state_dict() if name in self.emas else module.state_dict()
        out = self.run_dir / f"{name}.safetensors"
        export_safetensors(state, out, {"step": self.step})
        return out
