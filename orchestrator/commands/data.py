"""`nas-scam data inspect|synth|prepare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


LAYOUT_HELP = "dataset layout (default auto: detected from the files)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect, generate and prepare datasets")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    ins = sub.add_parser("inspect", help="per-class nuclei/pixel counts, sizes, mpp and warnings of a dataset")
    ins.add_argument("path", help="dataset folder (MoNuSAC, MoNuSeg or images/ + masks/)")
    ins.add_argument("--layout", default="auto", choices=["auto", "monusac", "monuseg", "folder"], help=LAYOUT_HELP)
    ins.add_argument("--channel-order", default="auto", choices=["auto", "rgb", "bgr"],
                     help="image/mask folders: images stored RGB or R/B-swapped (auto: vote on nuclei colour)")
    ins.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    ins.add_argument("--json", action="store_true", help="print the full report as JSON")
    ins.set_defaults(func=_inspect)

    syn = sub.add_parser("synth", help="write a synthetic MoNuSAC-layout dataset")
    syn.add_argument("--out", required=True, help="folder to write (created)")
    syn.add_argument("--images", type=int, default=24, help="number of images (default 24)")
    syn.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same images (default 0)")
    syn.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    syn.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    syn.set_defaults(func=_synth)

    pre = sub.add_parser("prepare", help="build the training cache (normalised images, crops, buckets, splits)")
    pre.add_argument("source", help="dataset folder (MoNuSAC, MoNuSeg or images/ + masks/)")
    pre.add_argument("--out", required=True, help="cache root; the cache is a keyed folder inside it")
    pre.add_argument("--layout", default="auto", choices=["auto", "monusac", "monuseg", "folder"], help=LAYOUT_HELP)
    pre.add_argument("--stain", default="none", choices=["none", "reinhard", "macenko"],
                     help="stain normalisation of every image (default none)")
    pre.add_argument("--stain-target", default=None, help="fit the stain target to this image instead")
    pre.add_argument("--split", default="0.6,0.2,0.2", help="counts '120,39,50' or fractions '0.6,0.2,0.2'")
    pre.add_argument("--split-by", default="image", choices=["image", "patient"],
                     help="split whole images (the paper) or whole patients (no patient in two splits)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    pre.add_argument("--crop-size", type=int, default=256, help="training crop side in pixels (default 256)")
    pre.add_argument("--stride", type=int, default=128, help="step between crops in pixels (default 128)")
    pre.add_argument("--channel-order", default="auto", choices=["auto", "rgb", "bgr"],
                     help="image/mask folders: images stored RGB or R/B-swapped (auto: vote on nuclei colour)")
    pre.add_argument("--skip-bad", action="store_true", help="skip unreadable files and report them")
    pre.set_defaults(func=_prepare)


def _inspect(args: argparse.Namespace) -> int:
    from nas_core.data.inspect import format_report, inspect_source

    rep = inspect_source(args.path, layout=args.layout, channel_order=args.channel_order, skip_bad=not args.strict)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 1 if rep["errors"] else 0


def _synth(args: argparse.Namespace) -> int:
    from nas_core.data.synthetic import write_synthetic
    from nas_core.engine.loop import ensure_writable_dir

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} already holds files (a dataset?); pass --overwrite to write into it "
                         f"or choose an empty folder")
    ensure_writable_dir(out)
    out = write_synthetic(args.out, n_images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {args.images} synthetic images ({args.size}x{args.size}) to {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from nas_core.data.dataset import PreparedData
    from nas_core.data.prepare import prepare

    path = prepare(args.source, args.out, layout=args.layout, stain=args.stain, split=args.split,
                   split_by=args.split_by, seed=args.seed, crop_size=args.crop_size, stride=args.stride,
                   channel_order=args.channel_order, stain_target=args.stain_target, skip_bad=args.skip_bad)
    data = PreparedData.open(path)
    st = data.class_stats
    print(path)
    for s in ("train", "val", "test"):
        print(f"{s:<6}{st[s]['images']:>5} images{st[s]['crops']:>7} crops  nuclei {st[s]['nuclei']}")
    print(f"buckets (train crops per rarest class): {st['train']['bucket_sizes']}")
    for item in data.manifest["skipped"]:
        print(f"skipped: {item['error']}")
    return 0
