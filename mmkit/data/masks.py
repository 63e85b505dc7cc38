"""COCO segmentations -> bool masks: polygons, uncompressed RLE and COCO's compressed RLE strings (no
pycocotools needed)."""

from __future__ import annotations

import numpy as np


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> (height, width) bool mask."""
    if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        from PIL import Image, ImageDraw

        canvas = Image.new("1", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[k]), float(poly[k + 1])) for k in range(0, len(poly) - 1, 2)], fill=1)
        return np.asarray(canvas, dtype=bool)
    if isinstance(seg, dict) and "counts" in seg:
        h, w = seg.get("size", (height, width))
        counts = seg["counts"]
        runs = _rle_string_counts(counts) if isinstance(counts, str | bytes) else [int(c) for c in counts]
        flat = np.zeros(h * w, dtype=bool)
        pos, value = 0, False
        for run in runs:
            flat[pos:pos + run] = value
            pos += run
            value = not value
        if pos != h * w:
            raise ValueError(f"RLE covers {pos} pixels but the mask is {h}x{w}")
        return flat.reshape((w, h)).T  # COCO's RLE runs down columns
    raise ValueError("a segmentation must be polygons (a list of [x, y, ...] lists) or RLE ({'counts', 'size'}); "
                     f"got {type(seg).__name__}")


def _rle_string_counts(s: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths (5 bits per character, continuation bit 0x20, sign bit 0x10
    on the last character, runs after the second stored as differences to the run two before)."""
    data = s.encode() if isinstance(s, str) else s
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts
