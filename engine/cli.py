"""What every entry point shares: arguments for launchers, config + run-dir handling, one-line errors."""

import argparse
import inspect
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from engine.config import load_config, save_config
from engine.errors import TesseraError


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (configs/...); omitted: the run directory's config.yaml")
    p.add_argument("--run-dir", required=True, help="run directory (created; re-running resumes)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank",
                   help=argparse.SUPPRESS)  # set by python -m torch.distributed.launch
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=2e-4 train.max_steps=100")
    return p


def signature_defaults(fn) -> dict:
    """Keyword defaults of a callable, as a config section schema."""
    out = {}
    for name, prm in inspect.signature(fn).parameters.items():
        if prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD) and name != "self":
            d = prm.default
            out[name] = None if d is inspect.Parameter.empty else (list(d) if isinstance(d, tuple) else d)
    return out


def resolve_run_config(args, sections: dict, training: bool) -> OmegaConf:
    """The config of a run: --config (+ overrides) for a new run; the saved one (+ overrides) to resume or
    evaluate. A --config whose model differs from the saved run's is refused (nothing is overwritten)."""
    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if args.config is None:
        if not saved.is_file():
            raise TesseraError(f"{run_dir} has no config.yaml: pass --config configs/... to start a new run")
        return load_config(str(saved), args.overrides, sections)
    cfg = load_config(args.config, args.overrides, sections)
    if training and saved.is_file():
        old = OmegaConf.load(saved)
        if OmegaConf.to_container(old.get("model"), resolve=True) != OmegaConf.to_container(cfg.model, resolve=True):
            raise TesseraError(
                f"{run_dir} holds a run with a different model config; "
                f"use a new --run-dir, or drop --config to resume it"
            )
    return cfg


def write_run_config(cfg, run_dir: Path, is_main: bool) -> None:
    if is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(run_dir) / "config.yaml")


def run_main(main) -> None:
    """Call main(); turn a TesseraError into one line on stderr and exit code 2."""
    try:
        main()
    except TesseraError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
