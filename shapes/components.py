"""Connected-component labelling of a batch of label images in numpy (no scipy).

Every foreground pixel starts with its own flat index as label; each sweep takes the minimum over same-class
neighbours and then jumps pointers (label ← label of the pixel it names). A label always names a pixel of the
same component with an index no larger than its own, so jumping is safe and the sweeps converge in a few
iterations to the component's smallest flat index — which doubles as a stable component id.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

_NEIGHBOURS = {
    4: ((0, 1), (1, 0), (0, -1), (-1, 0)),
    8: ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)),
}


def _slices(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices along one axis for reading the neighbour at ``+shift``."""
    if shift > 0:
        return slice(0, size - shift), slice(shift, size)
    if shift < 0:
        return slice(-shift, size), slice(0, size + shift)
    return slice(0, size), slice(0, size)


def label_components(classes: np.ndarray, connectivity: Literal[4, 8] = 8) -> np.ndarray:
    """Component ids for ``classes`` (B, H, W) int, where negative values are background.

    Two pixels are connected when they are neighbours (4- or 8-connectivity) with the same class. Returns
    (B, H, W) int64: for a foreground pixel the flat index (into the whole batch) of its component's first
    pixel in raster order, −1 for background. Components never span images.
    """
    if classes.ndim != 3:
        raise ValueError(f"classes must be (B, H, W), got shape {classes.shape}.")
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    _, height, width = classes.shape
    foreground = classes >= 0
    sentinel = classes.size  # larger than any pixel index, so it never wins a minimum
    labels = np.where(foreground, np.arange(classes.size).reshape(classes.shape), sentinel)

    links = []  # (destination view, source view, same-class mask) per neighbour direction
    for dy, dx in _NEIGHBOURS[connectivity]:
        (ys_dst, ys_src), (xs_dst, xs_src) = _slices(dy, height), _slices(dx, width)
        same = foreground[:, ys_dst, xs_dst] & (classes[:, ys_dst, xs_dst] == classes[:, ys_src, xs_src])
        if same.any():
            links.append(((slice(None), ys_dst, xs_dst), (slice(None), ys_src, xs_src), same))

    fg_index = np.flatnonzero(foreground)
    while True:
        updated = labels.copy()
        for dst, src, same in links:
            np.minimum(updated[dst], np.where(same, labels[src], sentinel), out=updated[dst])
        flat_updated = updated.reshape(-1)
        flat_updated[fg_index] = flat_updated[flat_updated[fg_index]]
        flat_updated[fg_index] = flat_updated[flat_updated[fg_index]]
        if np.array_equal(updated, labels):
            break
        labels = updated
    return np.where(foreground, labels, -1)
