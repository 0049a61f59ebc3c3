"""Uploaded images: size from the header before any decoding, then a bounded decode to RGB.

A 1 MB PNG can declare 20000 x 20000 pixels (1.2 GB once decoded): the width and height are read from
the PNG IHDR chunk, the JPEG start-of-frame segment or the first TIFF directory and refused over the
pixel limit before OpenCV allocates anything. A TIFF that repeats its width or height tag with
another value is refused: the decoder and this check could read different ones.
"""

from __future__ import annotations

import struct
from typing import Optional

from api.errors import ApiError

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257


def _png(raw: bytes) -> Optional[tuple[int, int]]:
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", raw[16:24])


def _jpeg(raw: bytes) -> Optional[tuple[int, int]]:
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", raw[pos + 2:pos + 4])
        if marker in _SOF:
            if pos + 9 > len(raw):
                return None
            height, width = struct.unpack(">HH", raw[pos + 5:pos + 9])
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _tiff(raw: bytes) -> Optional[tuple[int, int]]:
    order = "<" if raw[:2] == b"II" else ">"
    if len(raw) < 8 or struct.unpack(order + "H", raw[2:4])[0] != 42:
        return None  # BigTIFF (43) and anything else: not supported
    (ifd,) = struct.unpack(order + "I", raw[4:8])
    if ifd + 2 > len(raw):
        return None
    (count,) = struct.unpack(order + "H", raw[ifd:ifd + 2])
    found: dict[int, int] = {}
    for i in range(count):
        entry = raw[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT):
            # SHORT (3) sits in the first two bytes of the value field, LONG (4) fills it
            fmt, value = ("H", entry[8:10]) if kind == 3 else ("I", entry[8:12])
            size = struct.unpack(order + fmt, value)[0]
            if found.setdefault(tag, size) != size:
                # libtiff (OpenCV's decoder) keeps the first, a reader that keeps the last sees another
                # image: whichever this check read, the decoder may allocate the other
                name = "ImageWidth" if tag == _TIFF_WIDTH else "ImageLength"
                raise ApiError(422, "bad_image", f"body: the TIFF declares {name} twice ({found[tag]}, then {size}); "
                                                 f"refused as ambiguous")
    if len(found) < 2:
        return None
    return found[_TIFF_WIDTH], found[_TIFF_HEIGHT]


def image_size(raw: bytes) -> Optional[tuple[str, int, int]]:
    """``(format, width, height)`` read from the header of PNG, JPEG or TIFF bytes; None for anything else.
    ApiError 422 for a TIFF that declares its width or height twice, differently."""
    if raw.startswith(_PNG):
        fmt, size = "png", _png(raw)
    elif raw.startswith(b"\xff\xd8"):
        fmt, size = "jpeg", _jpeg(raw)
    elif raw[:4] in (b"II*\x00", b"MM\x00*"):
        fmt, size = "tiff", _tiff(raw)
    else:
        return None
    return (fmt, *size) if size and size[0] > 0 and size[1] > 0 else None


def decode_image(raw: bytes, max_pixels: int):
    """Encoded PNG/JPEG/TIFF bytes -> uint8 (H, W, 3) RGB; 413 over ``max_pixels`` before decoding."""
    import cv2
    import numpy as np

    if not raw:
        raise ApiError(422, "validation_error", "body: empty; send the image file",
                       [{"field": "(body)", "message": "empty"}])
    header = image_size(raw)
    if header is None:
        raise ApiError(422, "bad_image", "body: not a PNG, JPEG or TIFF image (or its header is damaged)")
    fmt, w, h = header
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large", f"image {w}x{h} ({fmt}) has more than {max_pixels} pixels "
                                               f"(NAS_SCAM_API_MAX_IMAGE_PIXELS)")
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ApiError(422, "bad_image", f"body: a {fmt} header but no decodable image")
    if img.shape[0] * img.shape[1] > max_pixels:  # a header that lied
        raise ApiError(413, "image_too_large", f"image {img.shape[1]}x{img.shape[0]} has more than {max_pixels} "
                                               f"pixels (NAS_SCAM_API_MAX_IMAGE_PIXELS)")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
