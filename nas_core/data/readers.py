"""Readers for the three supported on-disk layouts, all producing the same :class:`Sample`.

* ``monusac``: ``<root>/<patient>/<sub-image>.{svs,tif,xml}`` (the official MoNuSAC 2020 release; the
  patient folders may sit one level deeper, e.g. under ``MoNuSAC_images_and_annotations``).
* ``monuseg``: ``<root>/<name>.{tif,xml}``, same Aperio XML dialect with one class-less annotation:
  every nucleus gets label 1 (binary nuclei; classes 2-4 never occur).
* ``folder``: ``<root>/images/NAME.ext`` + ``<root>/masks/NAME.ext``; index masks (values 0..4) or
  colour masks snapped to a palette (nearest colour, so JPEG masks work).

Label maps: uint8 (H, W), 0 background, 1 Epithelial, 2 Lymphocyte, 3 Neutrophil, 4 Macrophage.
Instance maps: int32 (H, W), 0 background. Ignore masks: bool (H, W), True = excluded from loss/metrics.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from nas_core.classes import CLASS_NAMES, NUM_CLASSES, PALETTE

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# names that Aperio writes for non-class attributes ("Description" is ImageScope's default column)
_NON_CLASS_NAMES = {"", "description", "region", "text", "length", "area"}
_CLASS_ALIASES = {
    "epithelial": 1, "epithelium": 1, "epithelial cell": 1, "epithelial cells": 1,
    "lymphocyte": 2, "lymphocytes": 2,
    "neutrophil": 3, "neutrophils": 3,
    "macrophage": 4, "macrophages": 4,
}
AMBIGUOUS = -1
_CLIP_TOL = 2.0  # pixels a vertex may lie outside the image before a warning
_SUFFIX = re.compile(r"[_-]\d+$")


class DataError(ValueError):
    """Bad or unsupported input data; the message names the file and what was expected."""


@dataclass
class Sample:
    id: str
    patient: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8
    instances: np.ndarray  # (H, W) int32
    ignore: np.ndarray  # (H, W) bool
    mpp: Optional[float] = None
    nuclei: dict = field(default_factory=dict)  # class id -> number of nuclei
    warnings: list = field(default_factory=list)


@dataclass
class SampleRef:
    """A not-yet-loaded sample: what prepare/inspect iterate over (loading can fail per file)."""

    id: str
    patient: str
    files: tuple
    loader: Callable[[], Sample]

    def load(self) -> Sample:
        return self.loader()


def class_id(name: str) -> Optional[int]:
    """Normalise an annotation name: class id 1..4, AMBIGUOUS, or None for a non-class name."""
    key = " ".join(name.strip().lower().split())
    if key in _CLASS_ALIASES:
        return _CLASS_ALIASES[key]
    if key == "ambiguous":
        return AMBIGUOUS
    return None


def patient_of(stem: str) -> str:
    """Sub-image stem -> patient id: strips a ``_1``, ``_001`` or ``-3`` suffix."""
    return _SUFFIX.sub("", stem)


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---------------------------------------------------------------- images
def read_tiff_rgb(path: Path, bgr: bool = False) -> np.ndarray:
    """Page 0 of a TIFF/SVS as (H, W, 3) uint8 RGB. ``bgr``: the file stores B,G,R(,A)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            arr = tf.pages[0].asarray()
    except Exception as exc:  # tifffile/imagecodecs raise many types for damaged files
        raise DataError(f"{path}: cannot decode image page 0 ({type(exc).__name__}: {exc})") from None
    return _to_rgb(arr, path, bgr)


def read_image_file(path: Path, bgr: bool = False) -> np.ndarray:
    """Any supported image file as (H, W, 3) uint8 RGB."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        return read_tiff_rgb(path, bgr)
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise DataError(f"{path}: cannot decode image (truncated or not an image)")
    if arr.ndim == 3:  # OpenCV decodes to B,G,R(,A)
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]] if arr.shape[2] == 4 else arr[..., ::-1]
    return _to_rgb(arr, path, bgr)


def _to_rgb(arr: np.ndarray, path: Path, bgr: bool) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: expected 8-bit pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"{path}: expected an RGB(A) image, got shape {arr.shape}")
    arr = arr[..., :3]
    if bgr:
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- Aperio XML
def parse_aperio_xml(path: Path, shape: tuple, binary: bool = False):
    """Rasterise an Aperio ImageScope XML into (label, instances, ignore, mpp, nuclei, warnings).

    Polygons are filled with rows = Y, cols = X (cv2.fillPoly on rounded vertices); later regions
    overwrite earlier ones. Vertices outside the image are clipped by the fill (with a warning);
    regions entirely outside or with fewer than 3 vertices are dropped (with a warning).
    ``binary``: every region is class 1 (MoNuSeg). Otherwise each annotation's class comes from
    ``Annotation/Attributes/Attribute@Name`` (then ``Annotation@Name``); an annotation without a
    class name but with regions is an error, one with no regions is skipped with a warning.
    """
    path = Path(path)
    h, w = shape
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    if root.tag != "Annotations":
        raise DataError(f"{path}: expected an Aperio <Annotations> root, found <{root.tag}>")
    mpp = _float_or_none(root.get("MicronsPerPixel"))
    label = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.int32)
    ignore = np.zeros((h, w), np.uint8)
    nuclei = {c: 0 for c in range(1, NUM_CLASSES + 1)}
    notes: list[str] = []
    n_inst = 0
    for ann in root.iter("Annotation"):
        regions = ann.findall("./Regions/Region")
        if binary:
            cid = 1
        else:
            names = [a.get("Name", "") for a in ann.findall("./Attributes/Attribute")] + [ann.get("Name", "")]
            ids = [class_id(n) for n in names]
            known = [i for i in ids if i is not None]
            if not known:
                shown = ", ".join(repr(n) for n in names if n.strip()) or "(no name)"
                if regions:
                    raise DataError(f"{path}: annotation Id={ann.get('Id')} has unknown class name {shown} "
                                    f"with {len(regions)} regions; expected one of {', '.join(CLASS_NAMES)} "
                                    "or Ambiguous")
                notes.append(f"{path.name}: skipped empty annotation {shown}")
                continue
            cid = known[0]
        for reg in regions:
            pts = _vertices(reg, path)
            if len(pts) < 3:
                notes.append(f"{path.name}: region Id={reg.get('Id')} has {len(pts)} vertices; dropped")
                continue
            if not _bbox_overlaps(pts, h, w):
                notes.append(f"{path.name}: region Id={reg.get('Id')} lies outside the {w}x{h} image; dropped")
                continue
            # annotators' outlines touch the border at x = w or y = h: only real overshoot is news
            if (pts.min(0) < -_CLIP_TOL).any() or pts[:, 0].max() > w - 1 + _CLIP_TOL or pts[:, 1].max() > h - 1 + _CLIP_TOL:
                notes.append(f"{path.name}: region Id={reg.get('Id')} extends outside the {w}x{h} image; clipped")
            poly = [np.round(pts).astype(np.int32)]
            if cid == AMBIGUOUS:
                cv2.fillPoly(ignore, poly, 1)
                continue
            n_inst += 1
            cv2.fillPoly(label, poly, int(cid))
            cv2.fillPoly(inst, poly, n_inst)
            nuclei[cid] += 1
    return label, inst, ignore.astype(bool), mpp, nuclei, notes


def _vertices(reg: ET.Element, path: Path) -> np.ndarray:
    try:
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in reg.findall("./Vertices/Vertex")]
    except (TypeError, ValueError):
        raise DataError(f"{path}: region Id={reg.get('Id')} has a vertex without numeric X/Y") from None
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _bbox_overlaps(pts: np.ndarray, h: int, w: int) -> bool:
    return pts[:, 0].max() >= -0.5 and pts[:, 0].min() <= w - 0.5 and pts[:, 1].max() >= -0.5 and pts[:, 1].min() <= h - 0.5


def _float_or_none(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _emit(sample: Sample) -> Sample:
    for note in sample.warnings:
        warnings.warn(note, stacklevel=3)
    return sample


# ---------------------------------------------------------------- layouts
def _load_xml_sample(xml: Path, image_file: Path, bgr: bool, patient: str, binary: bool) -> Sample:
    image = read_tiff_rgb(image_file, bgr=bgr) if image_file.suffix.lower() in (".svs", ".tif", ".tiff") \
        else read_image_file(image_file)
    label, inst, ign, mpp, nuclei, notes = parse_aperio_xml(xml, image.shape[:2], binary=binary)
    return _emit(Sample(xml.stem, patient, image, label, inst, ign, mpp, nuclei, notes))


def list_monusac(root: Path, prefer: str = "svs") -> list[SampleRef]:
    """Official MoNuSAC layout. ``prefer``: read pixels from the ``.svs`` (page 0) or the ``.tif``
    (stored B,G,R,A: flipped to RGB here)."""
    refs = []
    for xml in sorted(Path(root).rglob("*.xml"), key=lambda p: natural_key(str(p))):
        candidates = {e: xml.with_suffix(e) for e in (".svs", ".tif")}
        order = [".svs", ".tif"] if prefer == "svs" else [".tif", ".svs"]
        image_file = next((candidates[e] for e in order if candidates[e].is_file()), None)
        if image_file is None:
            raise DataError(f"{xml}: no matching {xml.stem}.svs or {xml.stem}.tif next to it")
        bgr = image_file.suffix == ".tif"
        patient = xml.parent.name if xml.parent != Path(root) else patient_of(xml.stem)

        def load(xml=xml, image_file=image_file, bgr=bgr, patient=patient):
            return _load_xml_sample(xml, image_file, bgr, patient, binary=False)
        refs.append(SampleRef(xml.stem, patient, (image_file, xml), load))
    return refs


def list_monuseg(root: Path) -> list[SampleRef]:
    """MoNuSeg: flat ``NAME.tif`` (RGB) + ``NAME.xml``; binary nuclei, all labelled 1."""
    refs = []
    for xml in sorted(Path(root).rglob("*.xml"), key=lambda p: natural_key(str(p))):
        image_file = next((p for p in (xml.with_suffix(e) for e in (".tif", ".tiff", ".png")) if p.is_file()), None)
        if image_file is None:
            raise DataError(f"{xml}: no matching {xml.stem}.tif next to it")

        def load(xml=xml, image_file=image_file):
            return _load_xml_sample(xml, image_file, False, xml.stem, binary=True)
        refs.append(SampleRef(xml.stem, xml.stem, (image_file, xml), load))
    return refs


def mask_to_label(mask: np.ndarray, path: Path, palette=PALETTE):
    """Index mask (H, W) or colour mask (H, W, 3) -> (label uint8, warnings)."""
    notes = []
    if mask.ndim == 3 and mask.shape[2] >= 3:
        mask = mask[..., :3]
        if (mask[..., 0] == mask[..., 1]).all() and (mask[..., 1] == mask[..., 2]).all():
            mask = mask[..., 0]
    if mask.ndim == 2:
        values = np.unique(mask)
        if set(values.tolist()) <= {0, 255} and 255 in values:
            notes.append(f"{path.name}: 0/255 mask read as binary nuclei (label 1)")
            return (mask > 0).astype(np.uint8), notes
        if values.max() > NUM_CLASSES:
            raise DataError(f"{path}: index mask has value {int(values.max())}; expected 0..{NUM_CLASSES} "
                            "(or a colour mask in the palette)")
        return mask.astype(np.uint8), notes
    pal = np.asarray(palette, np.int32)
    # nearest palette colour: JPEG ringing moves colours a little, never to another palette entry
    flat = mask.reshape(-1, 3).astype(np.int32)
    d = ((flat[:, None, :] - pal[None]) ** 2).sum(-1)
    label = d.argmin(1).astype(np.uint8).reshape(mask.shape[:2])
    far = float((d.min(1) > 80 ** 2).mean())
    if far > 0.05:
        notes.append(f"{path.name}: {far:.1%} of mask pixels are far from every palette colour")
    return label, notes


def _rb_cue(image: np.ndarray, label: np.ndarray) -> float:
    """> 0 when the image is RGB: haematoxylin raises red optical density more than blue in nuclei."""
    nuc = label > 0
    if nuc.sum() < 50 or (~nuc).sum() < 50:
        return 0.0
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    d = od[nuc].mean(0) - od[~nuc].mean(0)
    return float((d[0] - d[2]) / (np.abs(d).sum() + 1e-6))


def list_folder(root: Path, channel_order: str = "auto", palette=PALETTE) -> list[SampleRef]:
    """``images/NAME.ext`` + ``masks/NAME.ext``. ``channel_order``: "rgb", "bgr" (images stored R/B
    swapped, like the MoNuSAC test-mask images), or "auto": a folder-wide vote on the nuclei colour
    (nuclei are bluer than their surround in true RGB) over up to 12 images with masks."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_EXTS)})")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"{mask_dir}: no mask for image(s) {', '.join(missing[:5])}")
    names = sorted(images, key=natural_key)
    if channel_order == "auto":
        channel_order = _vote_channel_order(images, masks, names, palette)
    if channel_order not in ("rgb", "bgr"):
        raise DataError(f"channel_order {channel_order!r}: expected 'rgb', 'bgr' or 'auto'")
    bgr = channel_order == "bgr"

    def load(name):
        image = read_image_file(images[name], bgr=bgr)
        raw = _read_mask_raw(masks[name])
        label, notes = mask_to_label(raw, masks[name], palette)
        if label.shape != image.shape[:2]:
            raise DataError(f"{masks[name]}: mask is {label.shape[1]}x{label.shape[0]} but image "
                            f"{images[name].name} is {image.shape[1]}x{image.shape[0]}")
        # semantic masks only: touching nuclei of one class become one instance
        inst = np.zeros(label.shape, np.int32)
        nuclei, offset = {c: 0 for c in range(1, NUM_CLASSES + 1)}, 0
        for c in range(1, NUM_CLASSES + 1):
            n, cc = cv2.connectedComponents((label == c).astype(np.uint8), connectivity=8)
            if n > 1:
                inst[cc > 0] = cc[cc > 0] + offset
                offset += n - 1
            nuclei[c] = n - 1
        return _emit(Sample(name, patient_of(name), image, label, inst, np.zeros(label.shape, bool),
                            None, nuclei, notes))
    return [SampleRef(n, patient_of(n), (images[n], masks[n]), (lambda n=n: load(n))) for n in names]


def _read_mask_raw(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        try:
            return tifffile.imread(path, key=0)
        except Exception as exc:
            raise DataError(f"{path}: cannot decode mask ({type(exc).__name__}: {exc})") from None
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise DataError(f"{path}: cannot decode mask (truncated or not an image)")
    if arr.ndim == 3:
        arr = arr[..., [2, 1, 0]] if arr.shape[2] >= 3 else arr
    return arr


def _vote_channel_order(images, masks, names, palette) -> str:
    cues = []
    for name in names[:12]:
        try:
            label, _ = mask_to_label(_read_mask_raw(masks[name]), masks[name], palette)
            image = read_image_file(images[name])
        except DataError:
            continue
        if image.shape[:2] == label.shape:
            cues.append(_rb_cue(image, label))
    votes = np.sign([c for c in cues if c != 0.0])
    return "bgr" if votes.size and votes.sum() < 0 else "rgb"


# ---------------------------------------------------------------- detection
def detect_layout(root: Path) -> str:
    """'monusac', 'monuseg' or 'folder'; DataError for a missing/empty folder or unknown layout."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, got a file")
    if not any(root.iterdir()):
        raise DataError(f"{root}: the folder is empty")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    xmls = sorted(root.rglob("*.xml"))
    if xmls:
        for xml in xmls:
            try:
                tree = ET.parse(xml).getroot()
            except ET.ParseError as exc:
                raise DataError(f"{xml}: malformed XML ({exc})") from None
            for ann in tree.iter("Annotation"):
                names = [a.get("Name", "") for a in ann.findall("./Attributes/Attribute")] + [ann.get("Name", "")]
                if any(class_id(n) not in (None,) for n in names):
                    return "monusac"
        return "monuseg"
    raise DataError(f"{root}: unknown dataset layout; expected <patient>/<image>.(svs|tif)+.xml (MoNuSAC), "
                    "<image>.tif+.xml (MoNuSeg) or images/ + masks/ folders")


def list_samples(root: Path, layout: str = "auto", channel_order: str = "auto",
                 palette=PALETTE, prefer: str = "svs") -> tuple[str, list[SampleRef]]:
    """Detect (or take) the layout and list its samples without loading them."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    if layout == "monusac":
        refs = list_monusac(root, prefer=prefer)
    elif layout == "monuseg":
        refs = list_monuseg(root)
    elif layout == "folder":
        refs = list_folder(root, channel_order=channel_order, palette=palette)
    else:
        raise DataError(f"layout {layout!r}: expected auto, monusac, monuseg or folder")
    if not refs:
        raise DataError(f"{root}: no samples found for layout {layout!r}")
    return layout, refs
