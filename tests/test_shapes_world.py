"""Shapes world: renderer, GenEval-format prompts and the exact classical detector."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.geneval.rules import relative_position
from shapes import prompts
from shapes.components import label_components
from shapes.detector import ShapeDetection, ShapesDetector, ShapesDetectorConfig
from shapes.raster import SceneObject, draw_scene, shape_mask
from shapes.relations import relation_components
from shapes.render import main as render_main
from shapes.render import render, sample_scene
from shapes.scene import SceneConfig, plan_scene
from shapes.vocab import BACKGROUND_RGB, CLASSES, COLOR_NAMES, COLORS, RELATIONS, TAGS
from tests.conftest import GENEVAL_SAMPLE, needs_geneval_sample

NUM_SCENES_PER_TAG = 200  # 1,200 scenes in all


def geneval_relations(box: tuple[float, ...], target: tuple[float, ...]) -> set[str]:
    """REFERENCE.md §4 relative_position, written out independently of the package's vectorised copy."""
    offset = [(box[0] + box[2] - target[0] - target[2]) / 2, (box[1] + box[3] - target[1] - target[3]) / 2]
    dims = [box[2] - box[0] + target[2] - target[0], box[3] - box[1] + target[3] - target[1]]
    revised = [math.copysign(max(abs(o) - 0.1 * d, 0.0), o) for o, d in zip(offset, dims, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


@pytest.fixture(scope="module")
def scenes() -> list[tuple[dict, list[SceneObject], np.ndarray]]:
    rng = np.random.default_rng(1234)
    config = SceneConfig()
    out = []
    for tag in TAGS:
        for _ in range(NUM_SCENES_PER_TAG):
            metadata = prompts.sample_metadata(tag, rng)
            objects = plan_scene(metadata, rng, config)
            out.append((metadata, objects, draw_scene(objects, image_size=config.image_size)))
    return out


@pytest.fixture(scope="module")
def detections(scenes) -> list[dict[str, list[ShapeDetection]]]:
    return ShapesDetector().detect_batch(np.stack([image for _, _, image in scenes]))


# Rasterisation ----------------------------------------------------------------------------------------------


def test_the_scene_samplers_vectorised_rule_is_geneval_s_rule():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 32, size=(2000, 2, 4))
    boxes = np.concatenate(
        [np.minimum(corners[..., :2], corners[..., 2:]), np.maximum(corners[..., :2], corners[..., 2:])], -1
    )
    a, b = boxes[:, 0], boxes[:, 1]
    dx, dy = relation_components(
        (a[:, 0] + a[:, 2] - b[:, 0] - b[:, 2]) / 2,
        (a[:, 1] + a[:, 3] - b[:, 1] - b[:, 3]) / 2,
        (a[:, 2] - a[:, 0]) + (b[:, 2] - b[:, 0]),
        (a[:, 3] - a[:, 1]) + (b[:, 3] - b[:, 1]),
    )
    names = ("left of", "right of", "above", "below")
    for i in range(len(boxes)):
        held = (dx[i] < -0.5, dx[i] > 0.5, dy[i] < -0.5, dy[i] > 0.5)
        vectorised = {name for name, h in zip(names, held, strict=True) if h}
        assert vectorised == relative_position(tuple(a[i]), tuple(b[i])) == geneval_relations(a[i], b[i])


@pytest.mark.parametrize("size", range(5, 21))
def test_shape_masks_are_tight_symmetric_and_distinct(size):
    masks = {cls: shape_mask(cls, size, size) for cls in CLASSES}
    for cls, mask in masks.items():
        assert mask.shape == (size, size)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), cls
        assert np.array_equal(mask, mask[:, ::-1]), cls
    for a in CLASSES:
        for b in CLASSES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, size)


def test_draw_scene_uses_exact_palette_colours():
    obj = SceneObject(cls="circle", color="orange", box=(3, 4, 11, 12))
    image = draw_scene([obj], image_size=16)
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 3:11] = shape_mask("circle", 8, 8)
    assert (image[mask] == COLORS["orange"]).all()
    assert (image[~mask] == BACKGROUND_RGB).all()


# Renderer ---------------------------------------------------------------------------------------------------


def test_scenes_respect_layout_rules(scenes):
    lo, hi = SceneConfig().object_size_range()
    for metadata, objects, _ in scenes:
        for i, a in enumerate(objects):
            x1, y1, x2, y2 = a.box
            assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
            assert x2 - x1 == y2 - y1 and lo <= x2 - x1 <= hi
            for b in objects[i + 1 :]:
                # At least one empty pixel between boxes along some axis.
                gap = max(b.box[0] - x2, x1 - b.box[2], b.box[1] - y2, y1 - b.box[3])
                assert gap >= 1, metadata["prompt"]
        per_class = Counter(o.cls for o in objects)
        for clause in metadata["include"]:
            assert per_class[clause["class"]] == clause["count"], metadata["prompt"]


def test_render_is_deterministic_per_seed():
    for tag in TAGS:
        metadata = prompts.sample_metadata(tag, np.random.default_rng(0))
        first = render(metadata, np.random.default_rng(7))
        again = render(metadata, np.random.default_rng(7))
        assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
        assert np.array_equal(first, again)
        others = [render(metadata, np.random.default_rng(seed)) for seed in range(8, 12)]
        assert any(not np.array_equal(first, other) for other in others)
        meta_a, image_a = sample_scene(tag, np.random.default_rng(3))
        meta_b, image_b = sample_scene(tag, np.random.default_rng(3))
        assert meta_a == meta_b and np.array_equal(image_a, image_b)


def test_render_other_image_size_is_detected_exactly():
    config = SceneConfig(image_size=64)
    rng = np.random.default_rng(5)
    detector = ShapesDetector()
    for tag in TAGS:
        metadata = prompts.sample_metadata(tag, rng)
        objects = plan_scene(metadata, rng, config)
        image = draw_scene(objects, image_size=64)
        assert image.shape == (64, 64, 3)
        found = sorted((cls, d.color, d.box) for cls, ds in detector.detect(image).items() for d in ds)
        assert found == sorted((o.cls, o.color, tuple(map(float, o.box))) for o in objects)


@pytest.mark.parametrize(
    "metadata",
    [
        {"tag": "single_object", "include": [{"class": "hexagon", "count": 1}]},
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "grey"}]},
        {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "circle", "count": 1}]},
        {"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]},
        {
            "tag": "counting",
            "include": [{"class": "triangle", "count": 2}],
            "exclude": [{"class": "triangle", "count": 2}],
        },
        {"tag": "nonsense", "include": [{"class": "circle", "count": 1}]},
    ],
)
def test_render_rejects_metadata_outside_the_vocabulary(metadata):
    with pytest.raises(ValueError):
        render(metadata, np.random.default_rng(0))


def test_distractors_use_unnamed_classes_only():
    config = SceneConfig(max_distractors=3)
    rng = np.random.default_rng(2)
    for _ in range(100):
        metadata = prompts.sample_metadata("two_object", rng)
        named = {c["class"] for c in metadata["include"]}
        objects = plan_scene(metadata, rng, config)
        assert all(o.cls not in named for o in objects if o.clause is None)
        assert sum(o.clause is not None for o in objects) == 2


# Detector ---------------------------------------------------------------------------------------------------


def test_detector_recovers_every_rendered_object(scenes, detections):
    for (metadata, objects, _), found in zip(scenes, detections, strict=True):
        assert set(found) == set(CLASSES)
        got = sorted((cls, d.color, d.box) for cls, ds in found.items() for d in ds)
        expected = sorted((o.cls, o.color, tuple(map(float, o.box))) for o in objects)
        assert got == expected, metadata["prompt"]
        for ds in found.values():
            for d in ds:
                x1, y1, x2, y2 = map(int, d.box)
                assert d.score == 1.0 and d.mask.shape == (32, 32) and d.mask.dtype == np.bool_
                assert d.mask[y1:y2, x1:x2].sum() == d.mask.sum()


def test_detections_satisfy_each_scene_metadata(scenes, detections):
    """Counts, colours and relations read off the detections alone match every record."""
    for (metadata, _, _), found in zip(scenes, detections, strict=True):
        groups = []
        for clause in metadata["include"]:
            group = found[clause["class"]]
            assert len(group) == clause["count"], metadata["prompt"]
            if "color" in clause:
                assert all(d.color == clause["color"] for d in group), metadata["prompt"]
            if "position" in clause:
                relation, target = clause["position"]
                for d in group:
                    for t in groups[target]:
                        # The placed relation holds and no other relation does.
                        assert geneval_relations(d.box, t.box) == {relation}, metadata["prompt"]
            groups.append(group)
        for clause in metadata.get("exclude", []):
            assert len(found[clause["class"]]) < clause["count"]


def test_detector_ignores_blends_specks_and_noise(scenes):
    detector = ShapesDetector()
    rng = np.random.default_rng(9)
    for metadata, objects, image in scenes[::40]:
        noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        # Isolated specks of a palette colour and off-palette pixels on the background.
        background = (image == BACKGROUND_RGB).all(axis=-1)
        ys, xs = np.nonzero(background)
        pick = rng.choice(len(ys), size=6, replace=False)
        noisy[ys[pick[:3]], xs[pick[:3]]] = COLORS["red"]
        noisy[ys[pick[3:]], xs[pick[3:]]] = (191, 64, 64)  # half-way between red and the background
        found = detector.detect(noisy)
        got = sorted((cls, d.color, d.box) for cls, ds in found.items() for d in ds)
        assert got == sorted((o.cls, o.color, tuple(map(float, o.box))) for o in objects), metadata["prompt"]


def test_detector_rejects_elongated_blobs_and_bad_input():
    image = np.full((32, 32, 3), BACKGROUND_RGB, dtype=np.uint8)
    image[10:14, 2:30] = COLORS["blue"]  # 28×4 bar: no shape class
    assert all(not ds for ds in ShapesDetector().detect(image).values())
    with pytest.raises(ValueError):
        ShapesDetector().detect(image.astype(np.float32))
    with pytest.raises(ValueError):
        ShapesDetectorConfig(max_color_distance=0)


def _bfs_components(classes: np.ndarray) -> int:
    """Reference 8-connected component count by breadth-first search."""
    seen = np.zeros(classes.shape, dtype=bool)
    count = 0
    h, w = classes.shape
    for start in zip(*np.nonzero(classes >= 0), strict=True):
        if seen[start]:
            continue
        count += 1
        queue = [start]
        seen[start] = True
        while queue:
            y, x = queue.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == classes[y, x]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_label_components_matches_breadth_first_search():
    rng = np.random.default_rng(0)
    classes = rng.integers(-1, 3, size=(20, 12, 12))
    ids = label_components(classes)
    assert ((ids >= 0) == (classes >= 0)).all()
    for b in range(len(classes)):
        assert len(np.unique(ids[b][ids[b] >= 0])) == _bfs_components(classes[b])
        # Every id names the first pixel (raster order) of its own component, inside its own image.
        roots = np.unique(ids[b][ids[b] >= 0])
        assert ((roots // 144) == b).all()


# Prompts ----------------------------------------------------------------------------------------------------


def test_prompt_wording_follows_geneval():
    assert prompts.single_object("circle")["prompt"] == "a photo of a circle"
    assert prompts.two_object("square", "triangle")["prompt"] == "a photo of a square and a triangle"
    assert prompts.counting("triangle", 3) == {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
        "prompt": "a photo of three triangles",
    }
    assert prompts.colors("triangle", "orange")["prompt"] == "a photo of an orange triangle"
    assert prompts.position("circle", "right of", "square") == {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a circle right of a square",
    }
    assert prompts.color_attr("circle", "orange", "square", "red") == {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "orange"},
            {"class": "square", "count": 1, "color": "red"},
        ],
        "prompt": "a photo of an orange circle and a red square",
    }


@needs_geneval_sample
def test_every_prompt_metadata_is_valid_geneval_format():
    from services.geneval.metadata import parse_metadata

    lines = GENEVAL_SAMPLE.read_text().splitlines()
    sample_keys = {tuple(json.loads(line)) for line in lines if line.strip()}
    seen_prompts = set()
    for tag in TAGS:
        records = prompts.all_metadata(tag)
        assert records, tag
        for record in records:
            keys = tuple(record)
            assert keys in sample_keys or (
                tag in ("two_object", "position") and keys == ("tag", "include", "prompt")
            )
            assert record["tag"] == tag and record["prompt"].startswith("a photo of ")
            for i, clause in enumerate(record["include"]):
                assert set(clause) <= {"class", "count", "color", "position"}
                assert clause["class"] in CLASSES and clause["count"] >= 1
                assert clause.get("color", "red") in COLOR_NAMES
                if "position" in clause:
                    relation, target = clause["position"]
                    assert relation in RELATIONS and 0 <= target < i
            for clause in record.get("exclude", []):
                assert set(clause) == {"class", "count"} and clause["count"] >= 1
            parse_metadata(record, known_classes=CLASSES)
            assert record["prompt"] not in seen_prompts
            seen_prompts.add(record["prompt"])


def test_split_is_deterministic_disjoint_and_covers_every_tag():
    config = prompts.PromptSplitConfig()
    train, test = prompts.split_prompts(config, seed=0)
    assert (train, test) == prompts.split_prompts(config, seed=0)
    assert test != prompts.split_prompts(config, seed=1)[1]
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_prompts & test_prompts
    assert len(test_prompts) == len(test)
    total = sum(len(prompts.all_metadata(tag)) for tag in TAGS)
    assert len(train) + len(test) == total
    for tag in TAGS:
        assert any(r["tag"] == tag for r in train) and any(r["tag"] == tag for r in test)

    balanced, balanced_test = prompts.split_prompts(prompts.PromptSplitConfig(num_train_per_tag=50), seed=0)
    assert balanced_test == test
    assert Counter(r["tag"] for r in balanced) == dict.fromkeys(TAGS, 50)
    assert not {r["prompt"] for r in balanced} & test_prompts


def test_command_lines_write_prompts_and_images(tmp_path, capsys):
    prompts.main(["--out-dir", str(tmp_path), "--seed", "3"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert (train, test) == prompts.split_prompts(prompts.PromptSplitConfig(), seed=3)

    record = test[0]
    out = tmp_path / "img.png"
    render_main(["--metadata", json.dumps(record), "--seed", "11", "--out", str(out)])
    expected = render(record, np.random.default_rng(11))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    render_main(["--metadata", str(tmp_path / "test.jsonl"), "--seed", "11", "--out", str(out)])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)


def test_shapes_world_imports_only_the_geneval_format_package():
    """The world's core (render, prompts, detector) uses GenEval's own tags, relations and prompt
    builders from the torch-free format package, and nothing else of services, nor the trainer."""
    allowed = [
        "services",
        "services.core",
        "services.core.quote",
        "services.geneval",
        "services.geneval.coco",
        "services.geneval.metadata",
        "services.geneval.prompts",
        "services.geneval.rules",
    ]
    code = (
        "import sys, shapes, shapes.render, shapes.prompts, shapes.detector;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('services', 'trainer')"
        f" and m not in {allowed}];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# GenEval rule engine on shapes-world detections -------------------------------------------------------------


def _mismatch(metadata: dict, objects: list[SceneObject], rng: np.random.Generator) -> dict:
    """A copy of ``metadata`` that the scene does not satisfy: wrong count, colour, class or relation."""
    wrong = json.loads(json.dumps(metadata))
    clause = wrong["include"][rng.integers(len(wrong["include"]))]
    present = {o.cls for o in objects}
    choices = ["count", "class"]
    if "color" in clause:
        choices.append("color")
    if "position" in clause:
        choices.append("relation")
    kind = choices[rng.integers(len(choices))]
    if kind == "count":
        clause["count"] += 1 if clause["count"] == 1 or rng.random() < 0.5 else -1
        wrong.pop("exclude", None)
    elif kind == "class":
        clause["class"] = str(rng.choice([c for c in CLASSES if c not in present]))
        wrong.pop("exclude", None)
    elif kind == "color":
        clause["color"] = str(rng.choice([c for c in COLOR_NAMES if c != clause["color"]]))
    else:
        clause["position"][0] = str(rng.choice([r for r in RELATIONS if r != clause["position"][0]]))
    return wrong


def test_geneval_rules_are_strict_exactly_on_matching_metadata(scenes, detections):
    from services.geneval.metadata import parse_metadata
    from services.geneval.rules import Detection, evaluate

    rng = np.random.default_rng(4)
    num_scenes = len(scenes)
    strict_own = correct_own = strict_wrong = 0
    for (metadata, objects, _), found in zip(scenes, detections, strict=True):
        dets = {
            cls: [Detection(box=d.box, score=d.score, mask=d.mask, color=d.color) for d in ds]
            for cls, ds in found.items()
        }
        own = evaluate(parse_metadata(metadata, known_classes=CLASSES), dets)
        strict_own += own.strict
        correct_own += own.correct
        wrong = _mismatch(metadata, objects, rng)
        strict_wrong += evaluate(parse_metadata(wrong, known_classes=CLASSES), dets).strict
    assert strict_own >= 0.995 * num_scenes and correct_own >= 0.995 * num_scenes
    assert num_scenes - strict_wrong >= 0.995 * num_scenes
