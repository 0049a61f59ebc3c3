"""`nas-scam data inspect|synth|prepare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestrator.cli import example


LAYOUT_HELP = "dataset layout (default auto: detected from the files)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect, generate and prepare datasets",
                              description="Inspect a dataset, write a synthetic MoNuSAC-layout one, or prepare the "
                                          "training cache (stain-normalised images, crops, class buckets, splits) "
                                          "that search, train and ablate read.",
                              epilog=example("nas-scam data prepare ../shared/data/monusac_test_masks --out /tmp/cache"))
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    ins = sub.add_parser("inspect", help="per-class nuclei/pixel counts, sizes, mpp and warnings of a dataset",
                         description="Read every image and annotation of a dataset once and report per-class "
                                     "nuclei and pixel counts, image sizes, microns per pixel and what looks wrong.",
                         epilog=example("nas-scam data inspect ../shared/data/monusac_test_masks"))
    ins.add_argument("path", help="dataset folder (MoNuSAC, MoNuSeg or images/ + masks/)")
    ins.add_argument("--layout", default="auto", choices=["auto", "monusac", "monuseg", "folder"], help=LAYOUT_HELP)
    ins.add_argument("--channel-order", default="auto", choices=["auto", "rgb", "bgr"],
                     help="image/mask folders: images stored RGB or R/B-swapped (auto: vote on nuclei colour)")
    ins.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    ins.add_argument("--json", action="store_true", help="print the full report as JSON")
    ins.set_defaults(func=_inspect)

    syn = sub.add_parser("synth", help="write a synthetic MoNuSAC-layout dataset",
                         description="Write a synthetic dataset in the official MoNuSAC layout (patient folders, "
                                     "TIFF images, Aperio XML annotations); the same seed writes the same images.",
                         epilog=example("nas-scam data synth --out /tmp/synth --images 24 --seed 0"))
    syn.add_argument("--out", required=True, help="folder to write (created)")
    syn.add_argument("--images", type=int, default=24, help="number of images (default 24)")
    syn.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same images (default 0)")
    syn.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    syn.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    syn.set_defaults(func=_synth)

    pre = sub.add_parser("prepare", help="build the training cache (normalised images, crops, buckets, splits)",
                         description="Build the training cache of a dataset: stain-normalised images, the crop "
                                     "grid, class buckets and splits, in a keyed folder under --out. The stain "
                                     "normalisation defaults to the protocol's (paper: macenko, code: none).",
                         epilog=example("nas-scam data prepare ../shared/data/monusac_test_masks --out /tmp/cache "
                                        "--split 0.6,0.2,0.2"))
    pre.add_argument("source", help="dataset folder (MoNuSAC, MoNuSeg or images/ + masks/)")
    pre.add_argument("--out", required=True, help="cache root; the cache is a keyed folder inside it")
    pre.add_argument("--layout", default="auto", choices=["auto", "monusac", "monuseg", "folder"], help=LAYOUT_HELP)
    pre.add_argument("--protocol", default="paper", choices=["paper", "code"],
                     help="the protocol whose stain normalisation --stain defaults to (default paper)")
    pre.add_argument("--stain", choices=["none", "reinhard", "macenko"],
                     help="stain normalisation of every image (default: the protocol's; paper macenko, code none)")
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

    from nas_core.config import protocol_table

    stain = args.stain or protocol_table(args.protocol)["data"]["stain"]
    path = prepare(args.source, args.out, layout=args.layout, stain=stain, split=args.split,
                   split_by=args.split_by, seed=args.seed, crop_size=args.crop_size, stride=args.stride,
                   channel_order=args.channel_order, stain_target=args.stain_target, skip_bad=args.skip_bad)
    data = PreparedData.open(path)
    st = data.class_stats
    print(path)
    for s in ("train", "val", "test"):
        print(f"{s:<6}{st[s]['images']:>5} images{st[s]['crops']:>7} crops  nuclei {st[s]['nuclei']}")
    print(f"buckets (train crops per rarest class): {st['train']['bucket_sizes']}")
    print(f"stain normalisation: {stain}" + ("" if args.stain else f" (the {args.protocol} protocol's; --stain to choose)"))
    for item in data.manifest["skipped"]:
        print(f"skipped: {item['error']}")
    return 0
