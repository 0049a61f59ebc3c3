"""Crop grids (release and flush) and stitching (method.md sections 5a and 7)."""
import numpy as np
import pytest
import torch

from nas_core.data.tiling import Stitcher, axis_positions, iter_tiles, pad_window, stitch, tile_positions


@pytest.mark.parametrize("length, windows", [(256, 3), (300, 3), (512, 5), (600, 5), (800, 7), (1000, 7),
                                             (100, 1), (255, 1), (257, 3)])
def test_release_grid_window_counts(length, windows):
    # the release's crop_recover.py: 2 * (H // 256) + 1 windows of 256 at stride 128 from 0
    pos = axis_positions(length, 256, 128, "release")
    assert pos == [128 * k for k in range(windows)]
    assert pos[-1] + 256 >= length  # the far side is covered (zero-padded)


def test_release_grid_crop_counts_and_other_strides():
    assert len(tile_positions(256, 256)) == 9 and len(tile_positions(512, 512)) == 25
    assert len(tile_positions(300, 1000)) == 3 * 7
    # scaled: crop c, stride c/2 -> 2 * (H // c) + 1; stride c -> H // c + 1 (the release with oc = 1)
    assert axis_positions(100, 32, 16, "release") == list(range(0, 112, 16))  # 2 * 3 + 1 = 7
    assert axis_positions(512, 256, 256, "release") == [0, 256, 512]
    # a stride that does not divide the crop: step on until a start reaches the last multiple of c
    assert axis_positions(500, 256, 200, "release") == [0, 200, 400]
    for length in range(1, 700, 7):
        for tile, stride in ((256, 128), (64, 48), (32, 32), (96, 40)):
            pos = axis_positions(length, tile, stride, "release")
            assert pos[0] == 0 and pos[-1] + tile >= length and np.all(np.diff(pos) == stride)


def test_flush_grid_is_kept_as_an_option():
    assert axis_positions(512, 256, 128, "flush") == [0, 128, 256]
    assert axis_positions(300, 256, 128, "flush") == [0, 44]
    assert axis_positions(100, 256, 128, "flush") == [0]
    pos = tile_positions(300, 517, grid="flush")
    assert pos[:, 0].max() + 256 == 300 and pos[:, 1].max() + 256 == 517
    with pytest.raises(ValueError, match="grid 'diagonal'"):
        axis_positions(300, 256, 128, "diagonal")


@pytest.mark.parametrize("grid", ["release", "flush"])
@pytest.mark.parametrize("h,w", [(256, 256), (512, 384), (300, 517), (100, 60), (257, 129), (640, 1000)])
def test_stitch_of_tiles_is_identity(h, w, grid):
    a = np.random.default_rng(h * w).random((2, h, w)).astype(np.float32)  # (C, H, W)
    hwc = a.transpose(1, 2, 0)
    tiles = [t.transpose(2, 0, 1) for _, _, t in iter_tiles(hwc, 256, 128, grid)]
    assert all(t.shape == (2, 256, 256) for t in tiles)
    assert np.array_equal(stitch(tiles, tile_positions(h, w, grid=grid), h, w, grid=grid), a)


def test_central_region_kept_as_the_release_recovers():
    # release recover_image (256/128): window i keeps rows 64..192 of itself, the first from 0, the
    # last to the edge, and the canvas is cropped to the image
    st = Stitcher(600, 512, 256, 128)
    for y, x in tile_positions(600, 512):
        st.add(y, x, np.full((256, 256), y * 1000 + x, np.int64))
    out = st.result()
    assert out.shape == (600, 512)
    rows = [out[r, 300] // 1000 for r in (0, 191, 192, 319, 320, 447, 448, 575, 576, 599)]
    assert rows == [0, 0, 128, 128, 256, 256, 384, 384, 512, 512]
    # 512 px: the window at 512 is all padding and 384 covers 448..511
    assert out[300, 511] % 1000 == 384 and (out % 1000 != 512).all()


def test_windows_that_own_no_pixel_are_not_needed():
    # 256 px: windows 0, 128, 256; the one at 256 is all padding, 128 keeps 192..255
    st = Stitcher(256, 256)
    assert st.positions().tolist() == [[0, 0], [0, 128], [128, 0], [128, 128]]
    for y, x in st.positions():
        st.add(y, x, np.ones((256, 256)))
    st.add(256, 0, np.zeros((256, 256)))  # a grid window that owns nothing: accepted, no effect
    assert st.result().all()
    assert len(Stitcher(512, 512).positions()) == 16 and len(Stitcher(1000, 1000).positions()) == 49


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
    with pytest.raises(ValueError, match="1 of the 16 needed"):
        st.result()
    with pytest.raises(ValueError, match="not a window origin"):
        st.add(64, 0, np.zeros((256, 256)))
