"""Crops and iterations per epoch that `ablate --plan` reports for a MoNuSAC-sized synthetic set.

209 synthetic images in the official layout, each side drawn uniformly from MoNuSAC's range
(height 81-1398 px, width 113-1956 px: the published image dimensions 113x81 - 1398x1956, training and
test images together), then the plan of experiments/table2.yaml on that folder for both protocols.
Prints one line per protocol; ``--images N`` generates fewer images (the counts then scale with N).

    PYTHONPATH=$PWD python bench/plan_monusac_sized.py --out /tmp/monusac-sized [--images 209]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = (81, 1398), (113, 1956)


def write_sized(out: Path, n_images: int, seed: int = 0) -> Path:
    """``n_images`` synthetic images of MoNuSAC-like varying sizes, official layout (BGRA .tif + .xml)."""
    import tifffile

    from nas_core.data.synthetic import aperio_xml, render_synthetic, synthetic_names

    if (out / ".complete").exists():
        return out
    rng = np.random.default_rng(seed)
    for i, (patient, stem) in enumerate(synthetic_names(n_images)):
        h, w = int(rng.integers(*HEIGHT, endpoint=True)), int(rng.integers(*WIDTH, endpoint=True))
        image, _, nuclei = render_synthetic((h, w), np.random.default_rng([seed, i]))
        folder = out / patient
        folder.mkdir(parents=True, exist_ok=True)
        bgra = np.concatenate([image[..., ::-1], np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
        tifffile.imwrite(folder / f"{stem}.tif", bgra, photometric="rgb", extrasamples=["unassalpha"])
        (folder / f"{stem}.xml").write_text(aperio_xml(nuclei))
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    from orchestrator.plan import build_plan
    from orchestrator.settings import get_settings
    from orchestrator.specs import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the synthetic images")
    ap.add_argument("--images", type=int, default=209)
    ap.add_argument("--methods", default="unet,nas-scam-p-sync", help="methods to plan (FLOP counting is slow)")
    args = ap.parse_args()
    t0 = time.monotonic()
    src = write_sized(args.out, args.images)
    print(f"{args.images} images written in {time.monotonic() - t0:.0f} s under {src}")
    # 209 images: each protocol's own count split; fewer: the paper's proportions
    scaled = {} if args.images == 209 else {"data.split": "0.574,0.187,0.239"}
    for protocol in ("paper", "code"):
        spec = load_spec(ROOT / "experiments" / "table2.yaml", protocol=protocol, methods=args.methods.split(","),
                         data={"source": str(src)},
                         overrides=scaled)
        t0 = time.monotonic()
        plan = build_plan(spec, get_settings(), progress=False)
        search = next(t for t in plan["trials"] if t["phase"] == "search")
        train = next(t for t in plan["trials"] if t["phase"] == "train")
        print(json.dumps({"protocol": protocol, "split": plan["protocol_lines"][0]["value"],
                          "images": plan["data"][0]["images"], "crops_per_split": plan["data"][0]["crops"],
                          "bucket_sizes": plan["data"][0]["bucket_sizes"],
                          "crops_per_epoch": search["crops_per_epoch"],
                          "iterations_per_epoch": {**search["iterations_per_epoch"], **train["iterations_per_epoch"]},
                          "plan_seconds": round(time.monotonic() - t0)}))


if __name__ == "__main__":
    main()
