"""The four MoNuSAC nucleus classes: their names, ids, mask colours and the paper's column order.

Class ids are the official ones: 0 background, 1 Epithelial, 2 Lymphocyte, 3 Neutrophil,
4 Macrophage. Label maps, prediction channels (channel c - 1 = class c), metrics, colour masks and
tables all use them; this module is their one definition.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("Epithelial", "Lymphocyte", "Neutrophil", "Macrophage")  # class id - 1
NUM_CLASSES = len(CLASS_NAMES)
CLASS_BY_ID: dict[int, str] = dict(enumerate(CLASS_NAMES, start=1))
# RGB per class id, background first: the colour-coded MoNuSAC test masks (a folder dataset's colour
# masks are snapped to it) and the prediction overlays
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (0, 255, 0), (255, 255, 0), (255, 0, 0), (0, 0, 255))
# Table 2's columns (method.md section 1): the Average, then the classes of ids 1, 2, 4, 3
TABLE_ORDER: tuple[str, ...] = ("Average", *(CLASS_BY_ID[c] for c in (1, 2, 4, 3)))
