"""Synthetic MoNuSAC-like data, written in the official layout so the real reader path is exercised.

Each image is H&E-like pink tissue with nuclei of the four classes, which differ the way real ones do:

=============  ==================================  ============================  ==================
class          shape / size (pixels at ~0.25 um)   colour                        surround
=============  ==================================  ============================  ==================
1 Epithelial   ovoid, a 10-14, b 7-10, clustered   medium purple, speckled       none
2 Lymphocyte   round, r 4.5-6.5                    very dark blue-purple         thin pale rim
3 Neutrophil   3-4 lobes, R 8-10                   dark purple                   pale pink granules
4 Macrophage   kidney-shaped/irregular, a 12-16    pale purple, fine texture     wide pale cytoplasm
=============  ==================================  ============================  ==================

Imbalance follows MoNuSAC: epithelial and lymphocyte nuclei are common, neutrophils and macrophages
rare (about 1-2 per 256x256) but present in most images. Epithelial nests and the inflammatory
infiltrate (lymphocytes, neutrophils, macrophages) occupy different places, so that every class
bucket gets crops. Labels are the rasterised polygons that are
written to the XML (integer vertices), so writing and reading back gives identical masks.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np

from nas_core.classes import CLASS_NAMES

# expected nuclei per 256x256 area: (mean, probability of forcing at least one)
_DENSITY = {1: (12.0, 0.0), 2: (14.0, 0.0), 3: (1.5, 0.85), 4: (1.3, 0.85)}
# RGB nucleus colours (before per-image stain jitter)
_NUC_RGB = {1: (128, 92, 168), 2: (48, 28, 100), 3: (78, 44, 138), 4: (162, 124, 190)}
_LINE_COLOURS = {1: 65280, 2: 65535, 3: 255, 4: 16711680}
SUFFIX_STYLES = ("_{k}", "_{k:03d}", "-{k}")


def _polygon(cid: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Nucleus outline centred on 0: (N, 2) float [x, y] and its bounding radius."""
    n = 48
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rot = rng.uniform(0, 2 * np.pi)
    if cid == 1:
        a, b = rng.uniform(10, 14), rng.uniform(7, 10)
        r = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2)
        r *= 1 + 0.05 * _smooth_noise(th, rng)
    elif cid == 2:
        r = rng.uniform(4.5, 6.5) * (1 + 0.04 * _smooth_noise(th, rng))
    elif cid == 3:
        lobes = int(rng.integers(3, 5))
        r = rng.uniform(8, 10) * (0.45 + 0.55 * np.abs(np.cos(lobes * th / 2)) ** 0.6)
    else:
        a, b = rng.uniform(12, 16), rng.uniform(8, 11)
        r = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2)
        dent = np.angle(np.exp(1j * (th - np.pi / 2)))  # indentation on the long side
        r *= (1 - 0.4 * np.exp(-dent ** 2 / (2 * 0.35 ** 2))) * (1 + 0.1 * _smooth_noise(th, rng))
    x, y = r * np.cos(th + rot), r * np.sin(th + rot)
    return np.stack([x, y], 1), float(r.max())


def _smooth_noise(th: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(th)
    for k in (2, 3, 4):
        out += rng.normal() * np.cos(k * th + rng.uniform(0, 2 * np.pi)) / k
    return out


def _field(shape, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in about [-1, 1] (upsampled coarse noise)."""
    h, w = shape
    coarse = rng.normal(size=(max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _count(cid: int, area_factor: float, rng: np.random.Generator) -> int:
    mean, force = _DENSITY[cid]
    n = int(rng.poisson(mean * area_factor))
    if force and rng.random() < force:
        n = max(n, 1)
    return n


def render_synthetic(size: int | tuple, rng: np.random.Generator, tint: np.ndarray | None = None):
    """One synthetic image. Returns (image (H, W, 3) uint8 RGB, label (H, W) uint8,
    nuclei: list of (class id, (N, 2) int32 [x, y] polygon)) in drawing order."""
    h, w = (size, size) if isinstance(size, int) else size
    tint = np.zeros(3, np.float32) if tint is None else tint
    area_factor = h * w / 256.0 ** 2
    # tissue: eosin pink with low-frequency density variation, fibres and a few pale gaps
    base = np.array([232, 168, 204], np.float32) + tint
    dens = 0.6 * _field((h, w), 48, rng) + 0.4 * _field((h, w), 12, rng)
    img = base[None, None, :] - dens[..., None] * np.array([10, 26, 14], np.float32)
    fibre = np.abs(_field((h, w), 6, rng))
    img -= (fibre < 0.12)[..., None] * np.array([6, 22, 10], np.float32)
    gaps = (_field((h, w), 64, rng) > 1.5)[..., None]
    img = np.where(gaps, np.array([245, 232, 240], np.float32), img)

    label = np.zeros((h, w), np.uint8)
    halo = np.zeros((h, w), np.uint8)
    nuclei: list[tuple[int, np.ndarray]] = []
    placed: list[tuple[float, float, float]] = []
    # tissue compartments: epithelial nests and an inflammatory infiltrate (lymphocytes with the rare
    # neutrophils/macrophages) in different places, so crops with a single class exist, as in MoNuSAC
    n_nest = max(1, int(round(1.5 * area_factor)))
    centres = rng.uniform(0, 1, size=(n_nest, 2)) * (w, h)
    far = rng.uniform(0, 1, size=(64, 2)) * (w, h)
    gap = np.min(np.linalg.norm(far[:, None] - centres[None], axis=2), axis=1)
    infil = far[np.argsort(-gap)[: max(1, int(round(area_factor)))]]
    order = [c for c in (1, 2, 3, 4) for _ in range(_count(c, area_factor, rng))]
    rng.shuffle(order)
    for cid in order:
        poly, rad = _polygon(cid, rng)
        margin = rad + (6 if cid in (3, 4) else 2)
        for _ in range(30):
            if cid == 1:  # epithelium grows in nests
                cx, cy = centres[rng.integers(len(centres))] + rng.normal(0, 0.12 * min(h, w), 2)
            elif rng.random() < (0.96 if cid == 2 else 0.8):  # inflammatory cells gather in the infiltrate
                cx, cy = infil[rng.integers(len(infil))] + rng.normal(0, 0.14 * min(h, w), 2)
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            if not (margin <= cx <= w - 1 - margin and margin <= cy <= h - 1 - margin):
                continue
            if all((cx - px) ** 2 + (cy - py) ** 2 > (rad + pr + 2) ** 2 for px, py, pr in placed):
                break
        else:
            continue
        pts = np.round(poly + (cx, cy)).astype(np.int32)
        placed.append((cx, cy, rad + (5 if cid == 4 else 0)))
        nuclei.append((cid, pts))
        if cid in (3, 4):  # cytoplasm: wide and pale for macrophages, granular pink for neutrophils
            scale = 1.7 if cid == 4 else 1.45
            cv2.fillPoly(halo, [np.round(poly * scale + (cx, cy)).astype(np.int32)], cid)
        elif cid == 2:
            cv2.circle(halo, (int(round(cx)), int(round(cy))), int(rad + 2), 2, -1)
        cv2.fillPoly(label, [pts], cid)

    grain = rng.normal(0, 1, (h, w)).astype(np.float32)
    halo_rgb = {2: (222, 196, 224), 3: (236, 190, 214), 4: (206, 170, 212)}
    for cid, rgb in halo_rgb.items():
        m = halo == cid
        img[m] = np.array(rgb, np.float32) + tint + grain[m, None] * (6 if cid == 3 else 3)
    chroma = cv2.GaussianBlur(grain, (0, 0), 0.8) * 1.6
    for cid in (1, 2, 3, 4):
        m = label == cid
        if not m.any():
            continue
        col = np.array(_NUC_RGB[cid], np.float32) + 0.5 * tint
        texture = {1: 22.0, 2: 5.0, 3: 8.0, 4: 12.0}[cid]
        img[m] = col + chroma[m, None] * texture
    img += grain[..., None] * 3.0
    img = cv2.GaussianBlur(img, (0, 0), 0.7)
    return np.clip(img, 0, 255).astype(np.uint8), label, nuclei


def aperio_xml(nuclei: list[tuple[int, np.ndarray]], mpp: float = 0.25) -> str:
    """Aperio ImageScope XML text: one Annotation per class (possibly without regions)."""
    lines = [f'<Annotations MicronsPerPixel="{mpp:.6f}">']
    rid = 0
    for cid, name in enumerate(CLASS_NAMES, start=1):
        lines += [f'\t<Annotation Id="{cid}" Name="" ReadOnly="0" Type="4" LineColor="{_LINE_COLOURS[cid]}" '
                  'Visible="1" Selected="0" MarkupImagePath="" MacroName="">',
                  f'\t\t<Attributes>\n\t\t\t<Attribute Name={quoteattr(name)} Id="0" Value=""/>\n\t\t</Attributes>',
                  '\t\t<Regions>', '\t\t\t<RegionAttributeHeaders>',
                  '\t\t\t\t<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>',
                  '\t\t\t\t<AttributeHeader Id="1" Name="Description" ColumnWidth="-1"/>',
                  '\t\t\t</RegionAttributeHeaders>']
        for c, pts in nuclei:
            if c != cid:
                continue
            rid += 1
            lines.append(f'\t\t\t<Region Id="{rid}" Type="0" Text="" NegativeROA="0" Analyze="1" DisplayId="{rid}">')
            lines.append('\t\t\t\t<Attributes/>\n\t\t\t\t<Vertices>')
            lines += [f'\t\t\t\t\t<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in pts.tolist()]
            lines.append('\t\t\t\t</Vertices>\n\t\t\t</Region>')
        lines += ['\t\t</Regions>', '\t\t<Plots/>', '\t</Annotation>']
    lines.append('</Annotations>')
    return "\n".join(lines) + "\n"


def synthetic_names(n_images: int, per_patient: int = 3) -> list[tuple[str, str]]:
    """(patient, sub-image stem) pairs; suffix styles rotate over _1, _001 and -1 like the release."""
    out = []
    for i in range(n_images):
        p, k = divmod(i, per_patient)
        patient = f"SYN-P{p + 1:03d}"
        out.append((patient, patient + SUFFIX_STYLES[p % len(SUFFIX_STYLES)].format(k=k + 1)))
    return out


def write_synthetic(out_dir: str | Path, n_images: int = 24, size: int = 512, seed: int = 0,
                    mpp: float = 0.25) -> Path:
    """Write ``n_images`` synthetic images in the official MoNuSAC layout under ``out_dir``:
    ``<patient>/<sub-image>.tif`` (stored B,G,R,A like the release) + ``.xml``. Deterministic for
    ``seed``. Returns ``out_dir``."""
    import tifffile

    if n_images < 1 or size < 32:
        raise ValueError(f"write_synthetic: need n_images >= 1 and size >= 32, got {n_images}, {size}")
    out = Path(out_dir)
    names = synthetic_names(n_images)
    tints: dict[str, np.ndarray] = {}
    for i, (patient, stem) in enumerate(names):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        if patient not in tints:  # stain differs by patient (slide), a little by image
            prng = np.random.default_rng(np.random.SeedSequence([seed, 10_000 + len(tints)]))
            tints[patient] = prng.normal(0, 7, 3).astype(np.float32)
        image, _, nuclei = render_synthetic(size, rng, tints[patient] + rng.normal(0, 2, 3).astype(np.float32))
        folder = out / patient
        folder.mkdir(parents=True, exist_ok=True)
        bgra = np.concatenate([image[..., ::-1], np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
        tifffile.imwrite(folder / f"{stem}.tif", bgra, photometric="rgb", extrasamples=["unassalpha"],
                         compression="zlib", compressionargs={"level": 1})
        (folder / f"{stem}.xml").write_text(aperio_xml(nuclei, mpp))
    return out

