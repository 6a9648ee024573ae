"""Packing samples into requests or model jobs without ever splitting a group.

Per-group outputs (e.g. diversity) are computed over the samples of one group that arrive together,
so both the client (chunking a big batch into requests) and the server (splitting a request into
batcher jobs) pack whole groups.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack_groups(
    group_ids: Sequence[str],
    *,
    max_count: int,
    weights: Sequence[int] | None = None,
    max_weight: int | None = None,
) -> list[list[int]]:
    """Indices packed greedily, in order of first appearance, into parts of ≤ max_count samples
    (and ≤ max_weight total weight). "" means no group: such a sample is a unit of its own.

    A single group over the limits becomes a part of its own rather than being split.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if weights is None:
        weights = [0] * len(group_ids)
    units: dict[str, list[int]] = {}
    for index, gid in enumerate(group_ids):
        units.setdefault(gid if gid else f"\0{index}", []).append(index)
    parts: list[list[int]] = []
    current: list[int] = []
    current_weight = 0
    for unit in units.values():
        unit_weight = sum(weights[i] for i in unit)
        over_count = len(current) + len(unit) > max_count
        over_weight = max_weight is not None and current_weight + unit_weight > max_weight
        if current and (over_count or over_weight):
            parts.append(current)
            current, current_weight = [], 0
        current.extend(unit)
        current_weight += unit_weight
    if current:
        parts.append(current)
    return parts
