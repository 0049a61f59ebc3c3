import numpy as np
import pytest
import torch

from nas_core.data.tiling import Stitcher, axis_positions, iter_tiles, pad_window, stitch, tile_positions


@pytest.mark.parametrize("h,w", [(256, 256), (512, 384), (300, 517), (100, 60), (257, 129), (640, 1000)])
def test_stitch_of_tiles_is_identity(h, w):
    a = np.random.default_rng(h * w).random((2, h, w)).astype(np.float32)  # (C, H, W)
    hwc = a.transpose(1, 2, 0)
    tiles = [t.transpose(2, 0, 1) for _, _, t in iter_tiles(hwc, 256, 128)]
    assert all(t.shape == (2, 256, 256) for t in tiles)
    assert np.array_equal(stitch(tiles, tile_positions(h, w), h, w), a)


def test_positions_cover_and_are_flush():
    assert axis_positions(512, 256, 128) == [0, 128, 256]
    assert axis_positions(300, 256, 128) == [0, 44]
    assert axis_positions(100, 256, 128) == [0]
    pos = tile_positions(300, 517)
    assert pos[:, 0].max() + 256 == 300 and pos[:, 1].max() + 256 == 517


def test_central_region_kept_for_regular_grid():
    st = Stitcher(512, 512, 256, 128)
    # each tile marks itself; the middle tile (128, 128) must own exactly the central block 192..320
    for y, x in st.positions():
        st.add(y, x, np.full((256, 256), y * 1000 + x, np.int64))
    out = st.result()
    owned = np.argwhere(out == 128 * 1000 + 128)
    assert owned.min(0).tolist() == [192, 192] and owned.max(0).tolist() == [319, 319]
    assert out[0, 0] == 0 and out[511, 511] == 256 * 1000 + 256  # border tiles reach the edge


def test_small_image_padding_and_torch():
    img = np.ones((40, 50, 3), np.uint8)
    win = pad_window(img, 0, 0, 64)
    assert win.shape == (64, 64, 3) and win[:40, :50].all() and not win[40:].any()
    st = Stitcher(40, 50, 64, 32)
    st.add(0, 0, torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64))
    out = st.result()
    assert isinstance(out, torch.Tensor) and out.shape == (1, 40, 50) and out[0, 1, 0] == 64


def test_missing_tile_is_an_error():
    st = Stitcher(512, 512)
    st.add(0, 0, np.zeros((256, 256)))
    with pytest.raises(ValueError, match="1 of 9"):
        st.result()
