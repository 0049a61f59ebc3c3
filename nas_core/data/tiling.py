"""Overlapping tiles and their inverse (method.md section 7).

Tiles of ``tile`` x ``tile`` at ``stride`` cover the image; the last tile on each axis is flush with the
edge (so no tile hangs over the border unless the image is smaller than a tile, where the one tile is
zero-padded). Stitching keeps, of each tile, the pixels nearer its centre than any neighbour's: for a
regular grid that is the central ``stride`` x ``stride`` block (central 128x128 for 256/128); border
tiles extend to the image edge. Every pixel is written by exactly one tile, so stitching the tiles of
an array reproduces it exactly.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def axis_positions(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last start is ``length - tile`` (flush with the edge)."""
    if tile < 1 or not 0 < stride <= tile:
        raise ValueError(f"tiling: need tile >= 1 and 0 < stride <= tile, got tile={tile}, stride={stride}")
    if length <= tile:
        return [0]
    pos = list(range(0, length - tile + 1, stride))
    if pos[-1] != length - tile:
        pos.append(length - tile)
    return pos


def tile_positions(h: int, w: int, tile: int = 256, stride: int = 128) -> np.ndarray:
    """(N, 2) int64 array of tile origins (y, x), row-major."""
    ys, xs = axis_positions(h, tile, stride), axis_positions(w, tile, stride)
    return np.array([(y, x) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)


def pad_window(arr: np.ndarray, y: int, x: int, tile: int, fill=0) -> np.ndarray:
    """``arr[y:y+tile, x:x+tile, ...]`` zero-padded (``fill``) to (tile, tile, ...): spatial dims first."""
    win = arr[y:y + tile, x:x + tile]
    if win.shape[0] == tile and win.shape[1] == tile:
        return win
    out = np.full((tile, tile) + arr.shape[2:], fill, dtype=arr.dtype)
    out[: win.shape[0], : win.shape[1]] = win
    return out


def iter_tiles(arr: np.ndarray, tile: int = 256, stride: int = 128) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (y, x, window (tile, tile, ...)) over an (H, W, ...) array."""
    for y, x in tile_positions(arr.shape[0], arr.shape[1], tile, stride):
        yield int(y), int(x), pad_window(arr, int(y), int(x), tile)


def _keep_bounds(positions: list[int], length: int, tile: int) -> list[tuple[int, int]]:
    """For each tile start, the [lo, hi) image range it owns: split at midpoints between centres."""
    bounds = []
    for i, p in enumerate(positions):
        lo = 0 if i == 0 else (positions[i - 1] + p + tile) // 2
        hi = length if i == len(positions) - 1 else (p + positions[i + 1] + tile) // 2
        bounds.append((lo, hi))
    return bounds


class Stitcher:
    """Reassemble per-tile outputs (..., tile, tile) into (..., H, W): channel dims first, spatial last.

    Works with numpy arrays and torch tensors (the buffer takes the first tile's type, dtype and
    device). ``add`` takes a tile origin from :func:`tile_positions`; ``result`` checks coverage.
    """

    def __init__(self, h: int, w: int, tile: int = 256, stride: int = 128):
        self.h, self.w, self.tile, self.stride = h, w, tile, stride
        ys, xs = axis_positions(h, tile, stride), axis_positions(w, tile, stride)
        self._rows = dict(zip(ys, _keep_bounds(ys, h, tile)))
        self._cols = dict(zip(xs, _keep_bounds(xs, w, tile)))
        self._out = None
        self._seen: set[tuple[int, int]] = set()

    def positions(self) -> np.ndarray:
        return tile_positions(self.h, self.w, self.tile, self.stride)

    def add(self, y: int, x: int, tile_out) -> None:
        y, x = int(y), int(x)
        if y not in self._rows or x not in self._cols:
            raise ValueError(f"Stitcher: ({y}, {x}) is not a tile origin for {self.h}x{self.w}, "
                             f"tile {self.tile}, stride {self.stride}")
        if tuple(tile_out.shape[-2:]) != (self.tile, self.tile):
            raise ValueError(f"Stitcher: tile output has spatial shape {tuple(tile_out.shape[-2:])}, "
                             f"expected ({self.tile}, {self.tile})")
        if self._out is None:
            shape = tuple(tile_out.shape[:-2]) + (self.h, self.w)
            if isinstance(tile_out, np.ndarray):
                self._out = np.zeros(shape, dtype=tile_out.dtype)
            else:  # torch tensor
                import torch
                self._out = torch.zeros(shape, dtype=tile_out.dtype, device=tile_out.device)
        (r0, r1), (c0, c1) = self._rows[y], self._cols[x]
        self._out[..., r0:r1, c0:c1] = tile_out[..., r0 - y:r1 - y, c0 - x:c1 - x]
        self._seen.add((y, x))

    def result(self):
        expected = len(self._rows) * len(self._cols)
        if self._out is None or len(self._seen) != expected:
            raise ValueError(f"Stitcher: {len(self._seen)} of {expected} tiles were added")
        return self._out


def stitch(tiles, positions, h: int, w: int, tile: int = 256, stride: int = 128):
    """Convenience: stitch an iterable of (..., tile, tile) outputs at ``positions`` (N, 2)."""
    st = Stitcher(h, w, tile, stride)
    for (y, x), t in zip(positions, tiles):
        st.add(y, x, t)
    return st.result()
