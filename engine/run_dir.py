"""Reading run directories: RUN_DIR/config.yaml and the weights in checkpoints/last.pt or *.safetensors."""

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from engine.checkpoint import load, load_state_strict
from engine.errors import TesseraError


def read_config(run_dir: Path, what: str):
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise TesseraError(f"{what} run directory not found: {run_dir}")
    if not path.is_file():
        raise TesseraError(
            f"{run_dir} is not a tessera run directory (no config.yaml); train one or convert a checkpoint"
        )
    return OmegaConf.load(path)


def load_weights(module, run_dir: Path, name: str = "model", use_ema: bool = True) -> str:
    """Load strictly from checkpoints/last.pt (EMA weights when kept) or, failing that, <name>.safetensors."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    st = run_dir / f"{name}.safetensors"
    if ckpt.is_file():
        state = load(ckpt)
        if use_ema and name in state.get("ema", {}):
            load_state_strict(module, state["ema"][name], f"{ckpt} (EMA)")
            return f"{ckpt} (EMA)"
        load_state_strict(module, state["modules"][name], str(ckpt))
        return str(ckpt)
    if st.is_file():
        load_state_strict(module, load_file(str(st)), str(st))
        return str(st)
    raise TesseraError(f"no weights in {run_dir}: expected checkpoints/last.pt or {name}.safetensors")
