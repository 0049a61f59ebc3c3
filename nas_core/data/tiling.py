"""Overlapping tiles and their inverse (method.md sections 5a and 7).

Two grids of ``tile`` x ``tile`` windows at ``stride`` (the config value ``data.grid``):

- ``release`` (default, the authors' crop_recover.py): windows start at 0, stride, 2 stride, ... up to
  and including the first start at or past ``tile * (H // tile)`` (the last multiple of the tile size
  inside the image), so per axis ``n = ceil(tile * (H // tile) / stride) + 1`` windows, zero-padded on
  the far side. With stride = tile / 2 that is the release's ``2 * (H // tile) + 1`` (256 px -> 3
  windows of 256, 300 -> 3, 512 -> 5, 600 -> 5, 800 -> 7, 1000 -> 7); with stride = tile it is the
  release's ``H // tile + 1``; a stride that does not divide the tile keeps the rule "step on until a
  window starts at or past the last multiple of the tile", which always covers the image. Windows may
  hang over the border, some entirely (a 256 px axis has a window at 256): their padding is zero in
  the image and ignored in labels.
- ``flush``: the last window on each axis ends exactly at the image edge, so no window hangs over the
  border unless the image is smaller than a tile (then the one window is zero-padded). Fewer crops;
  kept as an option for predicting on arbitrary images and for ablating the grid.

Stitching keeps, of each window, the pixels nearer its centre than any neighbour's: for a regular grid
the central ``stride`` x ``stride`` block (central 128x128 for 256/128, rows 64..192 of each window, as
the release's recover_image); border windows extend to the image edge, and the result is the image's
size (the release crops its padded canvas back the same way). Every image pixel is written by exactly
one window, so stitching the windows of an array reproduces it exactly; a window that owns no image
pixel (all padding, or overlapped by its neighbours) is not needed, and ``Stitcher.positions`` leaves
it out so inference skips it.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

GRIDS = ("release", "flush")


def axis_positions(length: int, tile: int, stride: int, grid: str = "release") -> list[int]:
    """Window starts along one axis of ``length`` pixels under ``grid`` (see the module docstring)."""
    if tile < 1 or not 0 < stride <= tile:
        raise ValueError(f"tiling: need tile >= 1 and 0 < stride <= tile, got tile={tile}, stride={stride}")
    if length < 1:
        raise ValueError(f"tiling: image axis length must be >= 1, got {length}")
    if grid == "release":
        n = math.ceil(tile * (length // tile) / stride) + 1
        return [k * stride for k in range(n)]
    if grid != "flush":
        raise ValueError(f"tiling: grid {grid!r} is not one of {', '.join(GRIDS)}")
    if length <= tile:
        return [0]
    pos = list(range(0, length - tile + 1, stride))
    if pos[-1] != length - tile:
        pos.append(length - tile)
    return pos


def tile_positions(h: int, w: int, tile: int = 256, stride: int = 128, grid: str = "release") -> np.ndarray:
    """(N, 2) int64 array of window origins (y, x), row-major: every window of the grid."""
    ys, xs = axis_positions(h, tile, stride, grid), axis_positions(w, tile, stride, grid)
    return np.array([(y, x) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)


def pad_window(arr: np.ndarray, y: int, x: int, tile: int, fill=0) -> np.ndarray:
    """``arr[y:y+tile, x:x+tile, ...]`` padded with ``fill`` to (tile, tile, ...): spatial dims first."""
    win = arr[y:y + tile, x:x + tile]
    if win.shape[0] == tile and win.shape[1] == tile:
        return win
    out = np.full((tile, tile) + arr.shape[2:], fill, dtype=arr.dtype)
    out[: win.shape[0], : win.shape[1]] = win
    return out


def iter_tiles(arr: np.ndarray, tile: int = 256, stride: int = 128,
               grid: str = "release") -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (y, x, window (tile, tile, ...)) over an (H, W, ...) array, every window of the grid."""
    for y, x in tile_positions(arr.shape[0], arr.shape[1], tile, stride, grid):
        yield int(y), int(x), pad_window(arr, int(y), int(x), tile)


def _keep_bounds(positions: list[int], length: int, tile: int) -> list[tuple[int, int]]:
    """For each window start, the [lo, hi) image range it owns: split at midpoints between centres,
    clipped to the image (lo >= hi: the window owns nothing)."""
    bounds = []
    for i, p in enumerate(positions):
        lo = 0 if i == 0 else (positions[i - 1] + p + tile) // 2
        hi = length if i == len(positions) - 1 else (p + positions[i + 1] + tile) // 2
        bounds.append((min(lo, length), min(hi, length)))
    return bounds


class Stitcher:
    """Reassemble per-window outputs (..., tile, tile) into (..., H, W): channel dims first, spatial last.

    Works with numpy arrays and torch tensors (the buffer takes the first window's type, dtype and
    device). ``positions()`` are the windows that own image pixels; ``add`` takes any window origin of
    the grid (one that owns nothing is accepted and ignored); ``result`` checks that every needed
    window was added.
    """

    def __init__(self, h: int, w: int, tile: int = 256, stride: int = 128, grid: str = "release"):
        self.h, self.w, self.tile, self.stride, self.grid = h, w, tile, stride, grid
        ys, xs = axis_positions(h, tile, stride, grid), axis_positions(w, tile, stride, grid)
        self._rows = dict(zip(ys, _keep_bounds(ys, h, tile)))
        self._cols = dict(zip(xs, _keep_bounds(xs, w, tile)))
        self._need_y = [y for y, (lo, hi) in self._rows.items() if lo < hi]
        self._need_x = [x for x, (lo, hi) in self._cols.items() if lo < hi]
        self._out = None
        self._seen: set[tuple[int, int]] = set()

    def positions(self) -> np.ndarray:
        """(N, 2) int64 origins of the windows that own at least one image pixel, row-major."""
        return np.array([(y, x) for y in self._need_y for x in self._need_x], dtype=np.int64).reshape(-1, 2)

    def add(self, y: int, x: int, tile_out) -> None:
        y, x = int(y), int(x)
        if y not in self._rows or x not in self._cols:
            raise ValueError(f"Stitcher: ({y}, {x}) is not a window origin of the {self.grid} grid for "
                             f"{self.h}x{self.w}, tile {self.tile}, stride {self.stride}")
        if tuple(tile_out.shape[-2:]) != (self.tile, self.tile):
            raise ValueError(f"Stitcher: window output has spatial shape {tuple(tile_out.shape[-2:])}, "
                             f"expected ({self.tile}, {self.tile})")
        (r0, r1), (c0, c1) = self._rows[y], self._cols[x]
        if r0 >= r1 or c0 >= c1:
            return  # owns no image pixel
        if self._out is None:
            shape = tuple(tile_out.shape[:-2]) + (self.h, self.w)
            if isinstance(tile_out, np.ndarray):
                self._out = np.zeros(shape, dtype=tile_out.dtype)
            else:  # torch tensor
                import torch
                self._out = torch.zeros(shape, dtype=tile_out.dtype, device=tile_out.device)
        self._out[..., r0:r1, c0:c1] = tile_out[..., r0 - y:r1 - y, c0 - x:c1 - x]
        self._seen.add((y, x))

    def result(self):
        expected = len(self._need_y) * len(self._need_x)
        if self._out is None or len(self._seen) != expected:
            raise ValueError(f"Stitcher: {len(self._seen)} of the {expected} needed windows were added")
        return self._out


def stitch(tiles, positions, h: int, w: int, tile: int = 256, stride: int = 128, grid: str = "release"):
    """Convenience: stitch an iterable of (..., tile, tile) outputs at ``positions`` (N, 2)."""
    st = Stitcher(h, w, tile, stride, grid)
    for (y, x), t in zip(positions, tiles):
        st.add(y, x, t)
    return st.result()
