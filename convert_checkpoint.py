"""Turn a released checkpoint into a tessera run directory.

    python convert_checkpoint.py --from taming-vqgan --ckpt last.ckpt --config model.yaml --out runs/vqgan_f16_16384
    python convert_checkpoint.py --from mar --ckpt checkpoint-last.pth --tokenizer runs/kl16 --out runs/mar_b

The result loads with models.load_tokenizer / load_prior, main_sample.py and main_tokenizer.py --eval.
Foreign pickles (argparse Namespace, OmegaConf, Lightning state) are read without executing anything.
"""

import argparse

from engine.cli import run_main
from models.convert import FORMATS, format_module


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="format", required=True, choices=sorted(FORMATS))
    p.add_argument("--ckpt", required=True, help="the released checkpoint file")
    p.add_argument("--config", default=None, help="the released config (yaml) when the format has one")
    p.add_argument("--tokenizer", default=None, help="tessera tokenizer run directory (for prior formats)")
    p.add_argument("--out", required=True, help="run directory to write")
    args, rest = p.parse_known_args()
    module = format_module(args.format)
    if hasattr(module, "add_arguments"):
        sub = argparse.ArgumentParser(prog=f"convert_checkpoint.py --from {args.format}")
        module.add_arguments(sub)
        sub.parse_args(rest, namespace=args)
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    out = module.convert(args)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
