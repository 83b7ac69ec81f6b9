"""The quickstart: shapes data -> VQ tokenizer -> GPT prior -> 1,000 samples -> metrics -> grid + GIF.

    make quickstart          (or: .venv/bin/python scripts/quickstart.py [--out runs/quickstart])

Every step is the same command a researcher would type; each is printed before it runs. Re-running
resumes finished steps. Takes under 10 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, args: list[str], log: list) -> float:
    cmd = [sys.executable, *args]
    print(f"\n== {title}\n$ python {' '.join(args)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    dt = time.time() - t0
    log.append((title, dt))
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 weights for Inception FID")
    args = p.parse_args()
    out = Path(args.out)
    vq, gpt, samples = out / "vq", out / "gpt", out / "samples"
    times: list = []
    t_start = time.time()
    step("1/5 train the VQ tokenizer on shapes",
         ["main_tokenizer.py", "--config", "configs/shapes/tokenizer/vq.yaml", "--run-dir", str(vq)], times)
    step("2/5 evaluate it and cache its tokens (with flips)",
         ["main_tokenizer.py", "--eval", "--run-dir", str(vq)], times)
    step("   reconstruction grid", ["main_tokenizer.py", "--reconstruct", "--run-dir", str(vq)], times)
    step("   token cache", ["main_tokenizer.py", "--cache", "--run-dir", str(vq)], times)
    step("3/5 train the class-conditional GPT prior",
         ["main_prior.py", "--config", "configs/shapes/prior/gpt.yaml", "--tokenizer", str(vq), "--run-dir", str(gpt),
          f"train.cache={vq / 'cache' / 'train'}"], times)
    step(f"4/5 sample {args.num_samples} class-balanced images (+ decoding GIF)",
         ["main_sample.py", "--prior", str(gpt), "--num-samples", str(args.num_samples), "--out", str(samples),
          "--batch-size", "100", "--gif"], times)
    metrics_json = out / "metrics.json"
    fid_args = ["compute_fid.py", str(samples.with_suffix(".npz")), "configs/shapes/tokenizer/vq.yaml:val",
                "--shapes", "--json",
                str(metrics_json)]
    if args.inception_weights:
        fid_args += ["--inception-weights", args.inception_weights]
    else:
        fid_args += ["--no-inception"]
    step("5/5 metrics: shapes classifier accuracy and shapes-FID", fid_args, times)

    tok = json.loads((vq / "eval_val.json").read_text())
    met = json.loads(metrics_json.read_text())
    print("\n== summary")
    rows = [
        ("tokenizer PSNR (val)", f"{tok['psnr']:.2f} dB"),
        ("tokenizer codebook usage", f"{100 * tok['codebook_usage']:.1f} %"),
        ("samples", f"{args.num_samples}"),
        ("class accuracy (shapes classifier)", f"{100 * met['shapes']['accuracy']:.1f} %"),
        ("shapes-FID vs val", f"{met['shapes']['fid']:.3f}"),
    ]
    if "fid" in met:
        rows.append(("Inception FID", f"{met['fid']:.2f}"))
    else:
        rows.append(("Inception FID", "off: pass --inception-weights pt_inception-2015-12-05-6726825d.pth"))
    rows += [(f"time: {t.strip()}", f"{dt:.0f} s") for t, dt in times]
    rows.append(("total time", f"{time.time() - t_start:.0f} s"))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\ngrid: {samples / 'grid.png'}\nGIF:  {samples / 'decoding.gif'}\n"
          f"reconstructions: {vq / 'samples' / 'reconstruction.png'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
