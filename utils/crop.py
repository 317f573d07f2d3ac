"""--crop head: each slice cut to the head before it is resized.

At 256 px a 512² slice whose head fills two thirds of it spends a third of the network's
pixels on air and table; the competition's 2nd place cropped each slice to the head. The
head is the largest connected region above HEAD_HU that fills its own box as a head does
(a table or a U-shaped head holder is larger than the skull's cap at the vertex, but fills
a few percent of its box), boxed with a margin and squared about its centre; what falls outside the image is
air (0 in every window). A slice without a head region (above the skull, a blank) is kept
whole. Array in, array out: the readers (utils.dicom) compute the mask on their hot path.

    box = head_box(hu > HEAD_HU)         # (top, left, side) or None
    box = head_box(sampled(hu) > HEAD_HU, hu.shape)  # the same, from the pixels it looks at
    img = crop_square(img, box)          # the square, padded with 0 where it leaves the image
"""
from __future__ import annotations

import cv2
import numpy as np

HEAD_HU = -500.0  # air is -1000, fat -100: skin and everything inside it lies above
CROPS = ("none", "head")
MARGIN = 0.04  # of the box's side, each way: the scalp stays in view
MIN_AREA = 0.005  # of the image: a smaller region is a wisp of noise, not a head
MIN_FILL = 0.3  # of its box: a head region fills about 0.6-0.8 of it, a holder or table much less
_SCALE = 4  # the mask's components are found at a quarter of the side (512 -> 128)

Box = tuple[int, int, int]  # top, left, side of a square in the slice's pixels


def sampled(image: np.ndarray) -> np.ndarray:
    """The pixels head_box looks at: every _SCALE-th row and column of a slice of 256 pixels
    or more a side (the readers gather the mask there alone), all of a smaller one."""
    return image[::_SCALE, ::_SCALE] if min(image.shape[:2]) >= 64 * _SCALE else image


def head_box(mask: np.ndarray, shape: tuple[int, int] | None = None) -> Box | None:
    """The square around the head in ``mask`` (H x W, bool or uint8: above HEAD_HU), with
    MARGIN each way: the largest connected region that fills MIN_FILL of its box (the largest
    of any when none does); None when no region covers MIN_AREA of the image. With ``shape``
    (the slice's rows and columns), ``mask`` is already ``sampled`` from it."""
    rows, cols = shape or mask.shape
    small = (mask if shape else sampled(mask)).astype(np.uint8)
    step = rows / small.shape[0], cols / small.shape[1]
    n, _, stats, _ = cv2.connectedComponentsWithStats(small, connectivity=8)
    regions = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= MIN_AREA * small.size]
    if not len(regions):
        return None
    # A head fills its box as an ellipse does (pi/4); the table and a U-shaped head holder,
    # larger than the skull's cap at the vertex, fill a few percent of theirs.
    fill = regions[:, cv2.CC_STAT_AREA] / (regions[:, cv2.CC_STAT_WIDTH] * regions[:, cv2.CC_STAT_HEIGHT])
    solid = regions[fill >= MIN_FILL] if (fill >= MIN_FILL).any() else regions
    left, top, width, height, _ = solid[np.argmax(solid[:, cv2.CC_STAT_AREA])]
    top0, left0 = top * step[0], left * step[1]
    bottom, right = (top + height) * step[0], (left + width) * step[1]  # the last sampled pixel's cell
    side = max(bottom - top0, right - left0) * (1 + 2 * MARGIN)
    centre_row, centre_col = (top0 + bottom) / 2, (left0 + right) / 2
    side = int(np.ceil(side))
    return int(round(centre_row - side / 2)), int(round(centre_col - side / 2)), side


def crop_square(img: np.ndarray, box: Box | None) -> np.ndarray:
    """``img`` (H x W [x C]) cut to ``box``, 0 where the box leaves the image; ``img`` itself
    when ``box`` is None."""
    if box is None:
        return img
    top, left, side = box
    out = np.zeros((side, side) + img.shape[2:], dtype=img.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, img.shape[0]), min(left + side, img.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = img[r0:r1, c0:c1]
    return out
