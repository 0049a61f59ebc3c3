"""`nas-scam search | train | evaluate | predict`: the nas_core loops from typed YAML configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from orchestrator.cli import example, preset_choices
from orchestrator.units import percent_tree

# what the printed JSON's numbers are (the files the engine writes keep fractions and 0-based epochs)
UNITS = "DSC, PQ and pixel accuracy in %; epochs 1-based"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?",
                   help="YAML run config, e.g. experiments/paper.yaml (the paper's protocol) or "
                        "experiments/code.yaml (the authors' release); the paper's defaults otherwise")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set search.lr_w=1e-3 (repeatable)")
    p.add_argument("--preset", choices=preset_choices(),
                   help="shrink the protocol: smoke = tiny crops and epochs on synthetic data, CPU minutes")
    p.add_argument("--data", help="dataset folder (MoNuSAC layout, MoNuSeg or images/+masks/); synthetic if omitted")
    p.add_argument("--out", required=True, help="output folder for checkpoints, genotype and metrics")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")


def _load(args: argparse.Namespace):
    from nas_core.config import load_config
    from orchestrator.settings import get_settings

    base = {"data": {"cache_dir": str(get_settings().data_root)}}
    overrides = list(args.overrides)
    if args.data:
        if not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such folder")
        overrides.append(f"data.source={Path(args.data).resolve()}")
    return load_config(args.config, overrides=overrides, preset=args.preset, base=base)


def _search(args: argparse.Namespace) -> int:
    from nas_core.engine import run_search

    cfg = _load(args)
    result = run_search(cfg, Path(args.out), resume=args.resume)
    print(json.dumps(percent_tree({"genotype": str(result.genotype_path), "best_epoch": result.best_epoch,
                                   "best_val_dsc": result.best_val.get("dsc/Average"), "units": UNITS}), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from nas_core.engine import run_train

    cfg = _load(args)
    result = run_train(cfg, Path(args.out), resume=args.resume)
    # the per-image rows stay in result.json (fractions, as every file the engine writes)
    test = {k: v for k, v in result.test.items() if k != "images"}
    print(json.dumps(percent_tree({"checkpoint": str(result.checkpoint_path), "best_epoch": result.best_epoch,
                                   "test": test, "units": UNITS, "result": str(Path(args.out) / "result.json")}),
                     indent=2, default=str))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.all:
        from orchestrator.rescore import cmd_evaluate_all
        return cmd_evaluate_all(args)
    from nas_core.config import config_from_dict
    from nas_core.data import ensure_dataset
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.device import resolve_device
    from nas_core.engine.evaluate import evaluate_split
    from nas_core.engine.loop import ensure_writable_dir
    from orchestrator.settings import get_settings

    target = Path(args.out) / f"metrics_{args.split}.json" if args.out else None
    if target is not None:
        if target.exists() and not args.overwrite:
            raise ValueError(f"{target} exists; pass --overwrite to replace it or choose another --out")
        ensure_writable_dir(target.parent)
    model, meta = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(meta["config"])
    # the data root is this machine's (the settings), not the one the checkpoint was trained on
    data_cfg = dataclasses.replace(cfg.data, cache_dir=str(get_settings().data_root))
    if args.data:
        data_cfg = dataclasses.replace(data_cfg, source=str(Path(args.data).resolve()))
    data = ensure_dataset(data_cfg, Path(data_cfg.cache_dir), data_cfg.seed)
    device = resolve_device(args.device)
    metrics = evaluate_split(model.to(device), data, args.split, tile=data_cfg.crop_size,
                             stride=data_cfg.stride, device=device, grid=data_cfg.grid, progress=True)
    if target is not None:  # the file keeps the engine's fractions, as metrics.json and result.json do
        target.write_text(json.dumps(metrics, indent=2, default=str))
    print(json.dumps({**percent_tree(metrics), "units": UNITS}, indent=2, default=str))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from nas_core.engine.loop import ensure_writable_dir
    from nas_core.engine.predict import predict_files

    out = Path(args.out)
    stems = [Path(p).stem for p in args.inputs]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise ValueError(f"inputs share the file name {twins[0]!r}: their predictions would overwrite each other")
    # the files predict_files writes per input
    targets = [out / f"{s}{suffix}" for s in stems for suffix in ("_labels.png", "_overlay.png", ".geojson")]
    existing = [p for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"--out {out} already holds predictions ({existing[0].name}"
                         f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); "
                         f"pass --overwrite to replace them or choose another --out")
    ensure_writable_dir(out)
    written = predict_files(args.checkpoint, args.inputs, args.out, device=args.device, bgr=args.bgr, progress=True)
    print(json.dumps(written, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="DARTS search of a NAS-SCAM genotype",
                       description="Search a NAS-SCAM genotype with DARTS (alternating weight and alpha steps) on "
                                   "one machine, without Ray or MLflow; writes genotype.json, checkpoints and "
                                   "metrics to --out.",
                       epilog=example("nas-scam search --preset smoke --set model.name=nas-scam-p --out /tmp/search"))
    _config_args(p)
    p.set_defaults(func=_search)

    p = sub.add_parser("train", help="retrain a model from scratch (NAS-SCAM from --set model.genotype=FILE)",
                       description="Retrain a registry model from scratch on one machine (NAS-SCAM nets from a "
                                   "searched genotype), keep the best-validation checkpoint and score the test split.",
                       epilog=example("nas-scam train --preset smoke --set model.name=unet --out /tmp/unet"))
    _config_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="tiled evaluation of a checkpoint on a split (global DSC, PQ)",
                       description="Score a checkpoint on whole images of a split, tiled on the crop grid it was "
                                   "trained with: global DSC per class (the paper's number), PQ, pixel accuracy. "
                                   "A progress bar counts the windows on a terminal.",
                       epilog=example("nas-scam evaluate --checkpoint /tmp/unet/best.pt --split test"))
    p.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train or search")
    p.add_argument("--data", help="evaluate on another dataset folder instead of the checkpoint's")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--out", help="folder for metrics_<split>.json (with --all: scores.json + per_image.csv; "
                                 "default eval-<folder name> beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--all", action="store_true", help="score every image of --data (no split, no cache)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="label masks, overlays and GeoJSON nuclei for images or SVS regions",
                       description="Predict nuclei classes on images with a checkpoint (its stain normalisation "
                                   "first), tiled; writes NAME_labels.png, NAME_overlay.png and NAME.geojson "
                                   "(QuPath) per input. A progress bar counts the windows on a terminal.",
                       epilog=example("nas-scam predict --checkpoint /tmp/unet/best.pt slide_region.png --out /tmp/pred"))
    p.add_argument("--checkpoint", required=True, help="a best.pt written by train (any registry model)")
    p.add_argument("inputs", nargs="+", help="image files (png, jpg, tif, svs)")
    p.add_argument("--out", required=True,
                   help="output folder: NAME_labels.png, NAME_overlay.png and NAME.geojson per input")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace earlier predictions of the same inputs in --out")
    p.add_argument("--bgr", action="store_true",
                   help="the files store R and B swapped (e.g. the MoNuSAC test-mask images)")
    p.set_defaults(func=_predict)
