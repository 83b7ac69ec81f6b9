"""Config loading: OmegaConf YAML + dotlist overrides, checked against a schema of known keys.

Sections with a fixed schema (``train``, ``data``, ``log``, ``loss``) reject unknown keys at load time.
``model`` and ``sampling`` are free-form here and checked once the class is known: ``model`` against the
registered class's constructor (``models.build_tokenizer`` / ``models.build_prior``), ``sampling`` against
the shared options plus the prior's own ``sampling_defaults`` (``samplers.logits.check_sampling_kwargs``).
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from engine.errors import TesseraError

TRAIN_DEFAULTS = dict(
    max_steps=1000,
    batch_size=64,  # global batch: split across processes, then across grad_accum micro-batches
    grad_accum=1,
    lr=1e-4,
    weight_decay=0.0,
    betas=[0.9, 0.999],
    eps=1e-8,
    schedule="constant",  # constant | cosine
    warmup_steps=0,
    min_lr_ratio=0.0,
    seed=0,
    ema=0.0,  # EMA decay of the weights; 0 disables
    grad_clip=0.0,  # max global grad norm; 0 disables
    precision="bf16",  # bf16 autocast on GPUs that support it (fp32 on CPU) | fp16 | fp32
    grad_checkpointing=False,
    fused_adam=True,  # fused AdamW where the device supports it
    log_every=50,
    ckpt_every=1000,
    keep_every=0,  # also keep checkpoints/step_NNNNNNN.pt every N steps; 0 keeps only last.pt
    num_workers=0,
    cache=None,  # prior training: path of a token cache written by main_tokenizer.py --cache
)

LOG_DEFAULTS = dict(wandb=None, wandb_entity=None, name=None)


def data_defaults() -> dict:
    from data import DATA_DEFAULTS

    return dict(DATA_DEFAULTS)


FREE_SECTIONS = ("model", "sampling")


def _schema(sections: dict) -> DictConfig:
    schema = OmegaConf.create({k: v for k, v in sections.items()})
    for key, value in sections.items():
        if key not in FREE_SECTIONS and isinstance(value, dict):
            OmegaConf.set_struct(schema[key], True)
    return schema


def _explain(err: OmegaConfBaseException, where: str) -> TesseraError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    if isinstance(err, ConfigKeyError) and key:
        return TesseraError(f"unknown config key '{key}' in {where}; check its spelling against configs/")
    return TesseraError(f"bad config in {where}: {str(err).splitlines()[0]}")


def load_config(path: str | None, overrides: list[str], sections: dict) -> DictConfig:
    """Merge ``sections`` (defaults per section) <- YAML file <- dotlist overrides; unknown keys fail.

    sections: e.g. {"model": {}, "train": TRAIN_DEFAULTS, "data": data_defaults(), "log": LOG_DEFAULTS}
    """
    cfg = _schema(sections)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TesseraError(f"config file not found: {p}; pass --config with a YAML from configs/")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:  # yaml errors come in many types
            raise TesseraError(f"cannot parse config {p}: {str(e).splitlines()[0]}") from e
        unknown = [k for k in file_cfg if k not in sections]
        if unknown:
            raise TesseraError(f"unknown config section '{unknown[0]}' in {p}; known: {', '.join(sections)}")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as e:
            raise _explain(e, str(p)) from e
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise TesseraError(f"override '{bad[0]}' is not of the form key=value (e.g. train.lr=2e-4)")
        unknown = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].split(".")[0] not in sections]
        if unknown:
            raise TesseraError(f"unknown config key '{unknown[0]}' in overrides; sections: {', '.join(sections)}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as e:
            raise _explain(e, "overrides") from e
    OmegaConf.resolve(cfg)
    return cfg


def save_config(cfg: DictConfig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg))
    tmp.replace(path)


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
