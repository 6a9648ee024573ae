"""The per-tag sample grid: rows in GenEval's tag order, each prompt's images side by side, framed by
correctness; checked pixel by pixel against where GridLayout says each image goes."""

from __future__ import annotations

import numpy as np
import pytest

from services.geneval.grid import CORRECT, UNJUDGED, WRONG, GridLayout, rows_by_tag, tag_grid

SIDE = 8


def _records_and_images() -> tuple[list[dict], np.ndarray, list[bool]]:
    # Record-major as the evaluators expand them: 3 images per prompt; tags out of GenEval order.
    prompts = [
        ("counting", "two squares"),
        ("single_object", "a circle"),
        ("counting", "three circles"),
        ("single_object", "a square"),
        ("single_object", "a triangle"),
        ("mystery", "odd one"),
    ]
    records = [{"tag": t, "prompt": p} for t, p in prompts for _ in range(3)]
    images = np.stack([np.full((SIDE, SIDE, 3), 10 * i, np.uint8) for i in range(len(records))])
    correct = [i % 2 == 0 for i in range(len(records))]
    return records, images, correct


def test_rows_follow_geneval_tag_order_then_the_rest() -> None:
    records, _, _ = _records_and_images()
    layout = GridLayout(prompts_per_row=2, images_per_prompt=2)
    rows = rows_by_tag(records, layout)
    assert [tag for tag, _ in rows] == ["single_object", "counting", "mystery"]
    assert rows[0][1] == [("a circle", [3, 4]), ("a square", [9, 10])]  # 2 prompts, 2 images each
    assert rows[1][1] == [("two squares", [0, 1]), ("three circles", [6, 7])]


@pytest.mark.parametrize("judged", [True, False])
def test_each_image_sits_in_its_frame_at_its_place(judged: bool) -> None:
    records, images, correct = _records_and_images()
    layout = GridLayout(prompts_per_row=2, images_per_prompt=2, scale=3)
    grid = np.asarray(tag_grid(images, records, correct if judged else None, layout))
    assert grid.shape[0] == 3 * layout.row_height(SIDE)
    for row, (_, prompts) in enumerate(rows_by_tag(records, layout)):
        for column, (_, indices) in enumerate(prompts):
            for k, index in enumerate(indices):
                x, y = layout.origin(SIDE, row, column, k)
                inner = grid[
                    y + layout.pad : y + layout.pad + SIDE * 3, x + layout.pad : x + layout.pad + SIDE * 3
                ]
                assert (inner == images[index][0, 0]).all()
                frame = tuple(grid[y, x])
                assert frame == ((CORRECT if correct[index] else WRONG) if judged else UNJUDGED)


def test_mismatched_lengths_are_refused() -> None:
    records, images, correct = _records_and_images()
    with pytest.raises(ValueError, match="images"):
        tag_grid(images[:-1], records, correct)
