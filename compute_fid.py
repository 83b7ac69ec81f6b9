"""FID, Inception Score, precision / recall (and KID, shapes metrics) of a sample set against a reference.

    python compute_fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception.pth
    python compute_fid.py runs/gpt/samples/ configs/shapes/prior/gpt.yaml:val --shapes --json out.json

SAMPLES: a folder of images, an ADM-format .npz (arr_0 uint8 NHWC) or a dataset config (FILE.yaml[:split]).
REFERENCE: any of those, an ADM reference batch (.npz with mu, sigma, arr_0) or a statistics .npz (mu, sigma).
Inception features (torch-fidelity's TF-exact port) are cached by content under $TESSERA_CACHE/fid_stats/.
"""

import argparse
import json
import sys

import torch

from engine.errors import TesseraError
from metrics.fid import frechet_distance
from metrics.inception import InceptionFeatures
from metrics.inception_score import inception_score
from metrics.inputs import open_images, open_reference, source_features
from metrics.kid import kernel_inception_distance
from metrics.precision_recall import precision_recall


def evaluate(samples, reference, inception: InceptionFeatures | None = None, inception_weights=None,
             device="cpu", batch_size: int = 50, kid: bool = False, pr: bool = True, shapes: bool = False,
             cache: bool = True, use_inception: bool = True) -> dict:
    """Metrics of SAMPLES against REFERENCE -> a JSON-ready dict (None where a metric cannot be computed).

    ``inception`` defaults to InceptionFeatures(inception_weights, device), made after the inputs are
    opened so that a bad path is reported before a missing network.
    """
    gen_images, ref = open_images(samples), open_reference(reference)
    out = {"samples": gen_images.name, "reference": ref.name, "reference_kind": ref.describe(),
           "num_samples": len(gen_images), "num_reference": len(ref.images) if ref.images else None}
    if shapes:
        from metrics.shapes import shapes_metrics

        out["shapes"] = shapes_metrics(gen_images.read_all(), labels=gen_images.labels)
    if not use_inception:
        return out
    if inception is None:
        inception = InceptionFeatures(inception_weights, device)
    gen = source_features(gen_images, inception, batch_size, cache)
    real = None
    if ref.images is not None and (ref.mu is None or pr or kid):
        real = source_features(ref.images, inception, batch_size, cache)
    mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else (real.mu, real.sigma)
    if mu.shape != gen.mu.shape:
        raise TesseraError(f"{ref.name}: reference statistics are {mu.shape[0]}-d, Inception pool features "
                           f"are {gen.mu.shape[0]}-d; use pool3 (2048-d) statistics")
    out["fid"] = frechet_distance(gen.mu, gen.sigma, mu, sigma)
    splits = min(10, len(gen_images))
    out["is_mean"], out["is_std"] = inception_score(gen.logits, splits=splits)
    if pr:
        out["precision"] = out["recall"] = None
        if real is not None:
            out["precision"], out["recall"] = precision_recall(real.pool, gen.pool, device=inception.device)
    if kid:
        out["kid_mean"] = out["kid_std"] = out["kid_subset_size"] = None
        if real is not None:
            kid_values = kernel_inception_distance(gen.pool, real.pool)
            out["kid_mean"], out["kid_std"], out["kid_subset_size"] = kid_values
    return out


def format_table(results: dict) -> str:
    """A small human-readable table of what evaluate() returned."""
    na = "n/a (reference has no images)"
    rows = [("samples", f"{results['samples']} ({results['num_samples']} images)"),
            ("reference", f"{results['reference']} ({results['reference_kind']})")]
    if "fid" in results:
        rows += [("FID", f"{results['fid']:.4f}"), ("IS", f"{results['is_mean']:.4f} ± {results['is_std']:.4f}")]
    else:
        rows.append(("Inception metrics", "off (--no-inception)"))
    if "precision" in results:
        rows += [(k, na if results[k] is None else f"{results[k]:.4f}") for k in ("precision", "recall")]
    if "kid_mean" in results:
        kid = results["kid_mean"], results["kid_std"], results["kid_subset_size"]
        rows.append(("KID", na if kid[0] is None else f"{kid[0]:.6f} ± {kid[1]:.6f} (subsets of {kid[2]})"))
    if "clip_score" in results:
        rows.append(("CLIP score", f"{results['clip_score']:.4f} (mean cosine {results['clip_cosine']:.4f})"))
    for k, v in results.get("shapes", {}).items():
        rows.append((f"shapes/{k}", f"{v:.4f}" if isinstance(v, float) else str(v)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="folder, ADM .npz, or FILE.yaml[:split]")
    p.add_argument("reference", help="ADM reference .npz, stats .npz (mu, sigma), or a SAMPLES-like source")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--kid", action="store_true", help="also compute KID")
    p.add_argument("--no-pr", action="store_true", help="skip precision / recall")
    p.add_argument("--shapes", action="store_true", help="also run the shapes-domain classifier metrics")
    p.add_argument("--no-inception", action="store_true",
                   help="skip FID / IS / precision / recall (e.g. no Inception weights here); other metrics still run")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached Inception features")
    p.add_argument("--clip-score", action="store_true", help="also the CLIP score of SAMPLES against --captions")
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="captions of the samples (.txt lines or .jsonl; sample i takes caption i mod count)")
    p.add_argument("--clip-weights", default=None, metavar="FILE", help="local CLIP ViT-B-32 state dict")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise TesseraError(f"--batch-size must be positive, got {args.batch_size}")
        results = evaluate(args.samples, args.reference, inception_weights=args.inception_weights,
                           device=args.device, batch_size=args.batch_size, kid=args.kid, pr=not args.no_pr,
                           shapes=args.shapes, cache=not args.no_cache, use_inception=not args.no_inception)
        if args.clip_score:
            from metrics.clip_score import clip_score_of

            results.update(clip_score_of(args.samples, args.captions, args.clip_weights, args.device,
                                         args.batch_size))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    except TesseraError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
