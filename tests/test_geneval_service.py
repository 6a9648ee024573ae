"""The GenEval reward service: detectors, colour classifier, scorer over loopback gRPC, CLI, prompt files.

Expected values are computed by hand from REFERENCE.md §4 in the comments next to them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from services.client import GrpcRewardClient, RewardError
from services.core.scorer import ScoreBatch
from services.geneval.coco import GENEVAL_CLASSES, geneval_names
from services.geneval.color import BACKGROUND_RGB, ColorClassifier, color_crop, load_clip
from services.geneval.detectors import Detections, DetectorConfig, DetectorInfo, build_detector
from services.geneval.detectors.shapes import ShapesWorldDetector
from services.geneval.metadata import COLORS, TAGS
from services.geneval.prompts import (
    PromptSpace,
    color_attr,
    colors,
    counting,
    generate,
    num_distinct,
    read_metadata_jsonl,
    single_object,
)
from services.geneval.prompts import main as prompts_main
from services.geneval.rules import Detection, RuleConfig
from services.geneval.scorer import OUTPUTS, GenEvalScorer
from services.server_args import parse_args
from shapes import prompts as shapes_prompts
from shapes.render import render, sample_scene
from tests.conftest import GENEVAL_SAMPLE, needs_geneval_sample, running_server
from tests.test_cli import serve

TOKENIZER = open_clip.get_tokenizer("ViT-L-14")  # open_clip's bundled CLIP BPE, offline


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def scene(metadata: dict, seed: int = 0) -> np.ndarray:
    return render(metadata, np.random.default_rng(seed))


async def served_scores(scorer: GenEvalScorer, images: Sequence[np.ndarray], metadata: Sequence) -> dict:
    async with running_server(scorer, name="geneval") as server:
        async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
            scores = await client.score(list(images), "any prompt", metadata=list(metadata))
    return scores.values


@pytest.fixture(scope="module")
def shapes_scorer() -> GenEvalScorer:
    return GenEvalScorer.build(detector="shapes")


@pytest.fixture(scope="module")
def tiny_clip() -> ColorClassifier:
    return ColorClassifier.tiny(seed=0)


# shapes detector over gRPC ----------------------------------------------------------------------------------


def test_rendered_scenes_score_one_for_their_own_metadata(shapes_scorer: GenEvalScorer) -> None:
    records, images = [], []
    for tag in TAGS:
        for seed in range(3):
            record, image = sample_scene(tag, np.random.default_rng(seed))
            records.append(record)
            images.append(image)
    values = run(served_scores(shapes_scorer, images, records))
    assert set(values) == set(OUTPUTS)
    np.testing.assert_array_equal(values["geneval/strict"], 1.0)
    np.testing.assert_array_equal(values["geneval/score"], 1.0)
    np.testing.assert_array_equal(values["geneval/correct"], 1.0)
    for tag in TAGS:
        np.testing.assert_array_equal(values[f"geneval/tag/{tag}"], [float(r["tag"] == tag) for r in records])


def test_mismatched_metadata_gets_the_hand_computed_partial_credit(shapes_scorer: GenEvalScorer) -> None:
    quirk_scorer = GenEvalScorer(ShapesWorldDetector(), rules=RuleConfig(extra_position_credit=True))
    three_circles = scene(shapes_prompts.counting("circle", 3))
    red_circle = scene(shapes_prompts.colors("circle", "red"))
    blue_circle = scene(shapes_prompts.colors("circle", "blue"), seed=1)
    circle_left_of_square = scene(shapes_prompts.position("circle", "left of", "square"))
    red_circle_blue_square = scene(shapes_prompts.color_attr("circle", "red", "square", "blue"))
    cases = [
        # (image, metadata, score, strict, correct)
        # found 3 for 2: 1 - |2-3|/2 = 0.5; original: top-2 fine but exclude "3 circles" fails.
        (three_circles, shapes_prompts.counting("circle", 2), 0.5, 0, 0),
        # found 3 for 4: 1 - |4-3|/4 = 0.75; original: fewer than 4.
        (three_circles, shapes_prompts.counting("circle", 4), 0.75, 0, 0),
        # found 3 for 1: 1 - |1-3|/1 = -1 (negative); original: the top-1 circle is there, no exclude.
        (three_circles, shapes_prompts.single_object("circle"), -1.0, 0, 1),
        # count ok (1), colour 1 - |1-0|/1 = 0 → mean(1, 0).
        (red_circle, shapes_prompts.colors("circle", "blue"), 0.5, 0, 0),
        # circle ok (1), square missing: 1 - |1-0|/1 = 0 → mean(1, 0).
        (red_circle, shapes_prompts.two_object("circle", "square"), 0.5, 0, 0),
        # square (1), circle count (1), "right of" fails (0) → 2/3.
        (circle_left_of_square, shapes_prompts.position("circle", "right of", "square"), 2 / 3, 0, 0),
        # swapped colours: circle (1, 0), square (1, 0) → 0.5.
        (red_circle_blue_square, shapes_prompts.color_attr("circle", "blue", "square", "red"), 0.5, 0, 0),
        # two circles side by side, one red: count 1, colour 1 - |2-1|/2 = 0.5 → 0.75; original needs 2 red.
        (
            np.concatenate([red_circle, blue_circle], axis=1),
            {"tag": "colors", "include": [{"class": "circle", "count": 2, "color": "red"}]},
            0.75,
            0,
            0,
        ),
    ]
    images = [c[0] for c in cases]
    records = [c[1] for c in cases]
    values = run(served_scores(shapes_scorer, images, records))
    np.testing.assert_allclose(values["geneval/score"], [c[2] for c in cases], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(values["geneval/strict"], [c[3] for c in cases])
    np.testing.assert_array_equal(values["geneval/correct"], [c[4] for c in cases])

    # The flow_grpo quirk appends 1.0 after the failed relation: (1 + 1 + 0 + 1) / 4.
    quirk = run(served_scores(quirk_scorer, images[5:6], records[5:6]))
    np.testing.assert_allclose(quirk["geneval/score"], [0.75], rtol=0, atol=1e-12)


def test_metadata_errors_are_invalid_argument_naming_the_field(shapes_scorer: GenEvalScorer) -> None:
    good_record = shapes_prompts.single_object("circle")
    good_image = scene(good_record)
    bad = [
        ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, "include[0].class"),
        ({"tag": "single_object", "include": [{"class": "circle", "count": 0}]}, "include[0].count"),
        (
            {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "teal"}]},
            "include[0].color",
        ),
        ({"tag": "colours", "include": [{"class": "circle", "count": 1}]}, "tag must be one of"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "colour": "red"}]}, "include[0] keys"),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "circle", "count": 1},
                    {"class": "square", "count": 1, "position": ["left of", 1]},
                ],
            },
            "include[1].position[1]",
        ),
        (
            {"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["above", 0]}]},
            "include[0].position",
        ),
        ({"tag": "counting", "include": []}, "include must be a non-empty list"),
        # 60 KB values (under the metadata limit) are quoted in part: the details stay under gRPC's
        # trailer limit, so the caller gets INVALID_ARGUMENT, not RESOURCE_EXHAUSTED.
        ({"tag": "x" * 60_000, "include": [{"class": "circle", "count": 1}]}, "(59902 more chars)"),
        ({"tag": "counting", "include": "y" * 60_000}, "include must be a non-empty list"),
        ({"tag": "counting", "include": [], "z" * 60_000: 1}, "unknown key(s) ['zzz"),
        ('{"tag": "single_object", "include": [', "not valid JSON"),
        (None, "requires metadata_json"),
    ]

    async def main() -> None:
        async with running_server(shapes_scorer, name="geneval") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                for metadata, field in bad:
                    with pytest.raises(RewardError) as err:
                        await client.score([good_image], "p", metadata=[metadata])
                    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (metadata, err.value)
                    assert field in err.value.message, (field, err.value.message)
                    assert len(err.value.message) < 600, err.value.message[:600]
                    # The server keeps serving after every rejection.
                    scores = await client.score([good_image], "p", metadata=[good_record])
                    assert scores.values["geneval/strict"].tolist() == [1.0]

    run(main())


def test_describe_reports_detector_thresholds_and_hash(shapes_scorer: GenEvalScorer) -> None:
    async def main() -> None:
        async with running_server(shapes_scorer, name="geneval") as server:
            async with GrpcRewardClient(f"127.0.0.1:{server.port}") as client:
                info = await client.describe()
        assert info.name == "geneval" and info.requires_metadata
        assert info.checkpoint_sha256 == "shapes-exact"
        assert "detector=shapes" in info.version and "score>0.3" in info.version
        assert "counting>0.9" in info.version and "extra_position_credit=off" in info.version
        assert tuple(info.outputs) == OUTPUTS

    run(main())


# colour classifier ------------------------------------------------------------------------------------------


def test_color_crop_composites_on_grey_then_crops_the_rounded_box() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:7] = True
    mask[4, 8] = True
    # round() is half-to-even as in PIL's crop: 2.5 → 2, 1.4 → 1, 8.5 → 8, 7.6 → 8.
    box = (2.5, 1.4, 8.5, 7.6)
    expected = np.where(mask[..., None], image, np.uint8(0x99))[1:8, 2:8]
    np.testing.assert_array_equal(np.asarray(color_crop(image, box, mask)), expected)
    assert BACKGROUND_RGB == (153, 153, 153)
    # Upstream's procedure written with PIL: composite on a "#999" canvas by the mask, crop the float box.
    upstream = Image.composite(
        Image.fromarray(image), Image.new("RGB", (12, 10), color="#999"), Image.fromarray(mask)
    ).crop(box)
    np.testing.assert_array_equal(np.asarray(color_crop(image, box, mask)), np.asarray(upstream))
    # No mask: the plain image, cropped.
    np.testing.assert_array_equal(np.asarray(color_crop(image, box, None)), image[1:8, 2:8])
    # A sliver box still gives one pixel.
    assert color_crop(image, (3.2, 3.2, 3.4, 3.4), None).size == (1, 1)
    with pytest.raises(ValueError, match="mask must have the image's size"):
        color_crop(image, box, mask[:5])


def reference_color_logits(model: torch.nn.Module, crop: Image.Image, cls_name: str) -> torch.Tensor:
    """REFERENCE.md §4 written out: 3 templates per colour, normalise, average, renormalise; 100·cos."""
    columns = []
    with torch.no_grad():
        for c in COLORS:
            texts = [
                f"a photo of a {c} {cls_name}",
                f"a photo of a {c}-colored {cls_name}",
                f"a photo of a {c} object",
            ]
            feats = F.normalize(model.encode_text(TOKENIZER(texts)), dim=-1)
            columns.append(F.normalize(feats.mean(dim=0), dim=-1))
        size = model.visual.image_size[0]
        pixels = TF.center_crop(TF.resize(crop, size, interpolation=TF.InterpolationMode.BICUBIC), size)
        pixels = TF.normalize(
            TF.to_tensor(pixels), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        )
        image_feature = F.normalize(model.encode_image(pixels[None]), dim=-1)[0]
    return 100.0 * image_feature @ torch.stack(columns, dim=1)


def test_tiny_color_classifier_equals_an_independent_computation(tiny_clip: ColorClassifier) -> None:
    rng = np.random.default_rng(1)
    crops = [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in [(9, 13), (40, 20)]
    ]
    crops.append(Image.new("RGB", (16, 16), color=(255, 0, 0)))
    classes = ["cat", "tv remote", "cat"]
    logits = tiny_clip.logits(crops, classes)
    expected = torch.stack(
        [reference_color_logits(tiny_clip.model, c, k) for c, k in zip(crops, classes, strict=True)]
    )
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # Each class has its own text classifier (the class name is in two of the templates).
    assert not torch.allclose(tiny_clip.text_classifier("cat"), tiny_clip.text_classifier("tv remote"))
    # classify() crops the detection and takes the argmax.
    image = np.asarray(crops[1])
    det = Detection(box=(0, 0, 20, 40), score=0.9)
    assert tiny_clip.classify([(image, "tv remote", det)]) == [COLORS[int(expected[1].argmax())]]


def test_clip_weights_load_from_a_local_state_dict(tiny_clip: ColorClassifier, tmp_path: Path) -> None:
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    from services.geneval.color import CLIP_MODEL_NAME, TINY_CLIP_KWARGS

    loaded = load_clip(path, model_name=CLIP_MODEL_NAME, **TINY_CLIP_KWARGS).eval()
    tokens = TOKENIZER(["a photo of a red cat"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), tiny_clip.model.encode_text(tokens))
    with pytest.raises(ValueError, match="--clip-checkpoint must be an existing file"):
        ColorClassifier.from_checkpoint(tmp_path / "missing.pt")


# scorer with injected detections ----------------------------------------------------------------------------


class FixedDetector:
    """In-memory detector returning the same colourless detections for every image."""

    def __init__(self, detections: Detections) -> None:
        self.detections = detections
        self.calls = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("cat", "dog")

    @property
    def info(self) -> DetectorInfo:
        return DetectorInfo(kind="fixed", description="test", weights_sha256="none", provides_color=False)

    def detect(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        self.calls += 1
        return [{k: list(v) for k, v in self.detections.items()} for _ in images]


def test_injected_detections_go_through_colour_and_rules(tiny_clip: ColorClassifier) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:20, 5:25] = True
    cat = Detection(box=(5, 5, 25, 20), score=0.8, mask=mask)
    dog = Detection(box=(40, 5, 55, 20), score=0.7)  # box only
    low = Detection(box=(30, 30, 40, 40), score=0.25)  # under the 0.3 threshold: never seen by the rules
    detector = FixedDetector({"cat": [cat, low], "dog": [dog]})
    scorer = GenEvalScorer(detector, color=tiny_clip)
    cat_color = COLORS[int(tiny_clip.logits([color_crop(image, cat.box, mask)], ["cat"])[0].argmax())]
    dog_color = COLORS[int(tiny_clip.logits([color_crop(image, dog.box, None)], ["dog"])[0].argmax())]
    other = next(c for c in COLORS if c != cat_color)

    def record(cat_c: str, rel: str) -> dict:
        return {
            "tag": "color_attr",
            "include": [
                {"class": "dog", "count": 1, "color": dog_color},
                {"class": "cat", "count": 1, "color": cat_c, "position": [rel, 0]},
            ],
        }

    records = [record(cat_color, "left of"), record(other, "left of"), record(cat_color, "right of")]
    for r in records:
        scorer.validate("p", r)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    out = scorer.score(ScoreBatch(images=[tensor] * 3, prompts=["p"] * 3, metadata=records))
    # All right: dog (count 1, colour 1), cat (count 1, colour 1, position 1) → 1.
    # Wrong cat colour: dog (1, 1), cat (1, 0) and no position check after a failed colour → 3/4.
    # Wrong relation (the cat is left of the dog): dog (1, 1), cat (1, 1, 0) → 4/5.
    np.testing.assert_allclose(out.samples["geneval/score"].numpy(), [1.0, 0.75, 0.8])
    np.testing.assert_array_equal(out.samples["geneval/strict"].numpy(), [1, 0, 0])
    np.testing.assert_array_equal(out.samples["geneval/correct"].numpy(), [1, 0, 0])
    with pytest.raises(ValueError, match=r"include\[0\].class"):
        scorer.validate("p", {"tag": "single_object", "include": [{"class": "circle", "count": 1}]})
    with pytest.raises(ValueError, match="colour classifier is required"):
        GenEvalScorer(detector)


# ultralytics detector ---------------------------------------------------------------------------------------


def test_ultralytics_random_yolo_segment_model_runs_end_to_end_offline() -> None:
    # conf 0 and rule threshold 0 push the random model's boxes and masks through colour and rules.
    scorer = GenEvalScorer.build(
        tiny=True, detector="ultralytics", detector_conf=0.0, score_threshold=0.0, detector_imgsz=64
    )
    assert scorer.identity.checkpoint_sha256 == "tiny:0"
    assert "yolo11n-seg.yaml" in scorer.identity.version and "task=segment" in scorer.identity.version
    assert scorer.detector.class_names == GENEVAL_CLASSES
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    raw = scorer.detector.detect([torch.from_numpy(i).permute(2, 0, 1) for i in images])
    some = [d for per_image in raw for dets in per_image.values() for d in dets]
    assert some and all(d.mask is not None and d.mask.shape == (48, 64) for d in some)
    records = [
        colors("person", "red"),
        counting("tv remote", 2),
        {
            "tag": "position",
            "include": [
                {"class": "dog", "count": 1},
                {"class": "person", "count": 1, "position": ["above", 0]},
            ],
        },
    ]
    values = run(served_scores(scorer, images, records))
    for name in OUTPUTS:
        assert values[name].shape == (3,) and np.isfinite(values[name]).all(), name
    assert set(values["geneval/strict"].tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(values["geneval/tag/colors"], [1, 0, 0])


def test_ultralytics_detect_model_gives_boxes_without_masks() -> None:
    detector = build_detector(
        "ultralytics", DetectorConfig(weights="yolo11n.yaml", conf=0.0, imgsz=64), tiny=True
    )
    assert detector.info.weights_sha256 == "tiny:0" and not detector.info.provides_color
    (per_image,) = detector.detect([torch.zeros(3, 40, 30, dtype=torch.uint8)])
    dets = [d for v in per_image.values() for d in v]
    assert dets and all(d.mask is None and 0 <= d.box[0] <= d.box[2] <= 30 for d in dets)


def test_detector_and_scorer_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs --detector-weights"):
        build_detector("ultralytics", DetectorConfig())
    with pytest.raises(ValueError, match="use it with --tiny only"):
        build_detector("ultralytics", DetectorConfig(weights="yolo11n.yaml"))
    with pytest.raises(ValueError, match="must be an existing file"):
        build_detector("ultralytics", DetectorConfig(weights="yolo11n.pt"))
    with pytest.raises(ValueError, match="no weights"):
        build_detector("shapes", DetectorConfig(weights="x.pt"))
    with pytest.raises(ValueError, match="detector must be one of"):
        build_detector("mask2former")
    with pytest.raises(ValueError, match="--detector-conf must be <="):
        GenEvalScorer.build(detector="shapes", detector_conf=0.5)
    with pytest.raises(ValueError, match="not --checkpoint"):
        GenEvalScorer.build(checkpoint="x")
    with pytest.raises(ValueError, match="80 COCO classes"):
        geneval_names(("person", "bicycle"))
    assert (
        geneval_names(tuple("mouse" if c == "computer mouse" else c for c in GENEVAL_CLASSES))
        == GENEVAL_CLASSES
    )


# command line -----------------------------------------------------------------------------------------------


def test_serve_parses_scorer_options_and_keeps_other_scorers_working() -> None:
    args = parse_args(
        ["geneval", "--detector", "ultralytics", "--tiny", "--extra-position-credit", "--port", "0"]
    )
    assert args.scorer_options["detector"] == "ultralytics"
    assert args.scorer_options["extra_position_credit"] is True
    assert args.scorer_options["score_threshold"] == 0.3
    assert parse_args(["compressibility"]).scorer_options == {}
    with pytest.raises(SystemExit):
        parse_args(["compressibility", "--detector", "shapes"])


def test_serve_geneval_from_the_shell() -> None:
    record = shapes_prompts.color_attr("triangle", "green", "circle", "white")
    with serve("geneval", "--detector", "shapes") as (_, endpoint):

        async def main() -> dict:
            async with GrpcRewardClient(endpoint) as client:
                return (await client.score([scene(record)], "p", metadata=[record])).values

        values = run(main())
    assert values["geneval/strict"].tolist() == [1.0] and values["geneval/tag/color_attr"].tolist() == [1.0]


# prompts ----------------------------------------------------------------------------------------------------


@needs_geneval_sample
def test_prompt_builders_reproduce_upstream_records() -> None:
    rebuilt = {
        "single_object": lambda inc: single_object(inc[0]["class"]),
        "counting": lambda inc: counting(inc[0]["class"], inc[0]["count"]),
        "colors": lambda inc: colors(inc[0]["class"], inc[0]["color"]),
        "color_attr": lambda inc: color_attr(
            inc[0]["class"], inc[0]["color"], inc[1]["class"], inc[1]["color"]
        ),
    }
    records = read_metadata_jsonl(GENEVAL_SAMPLE, known_classes=GENEVAL_CLASSES)
    assert len(records) == 12
    for record in records:
        assert rebuilt[record["tag"]](record["include"]) == record


def test_generated_prompts_follow_geneval_conventions() -> None:
    records = generate(40, seed=5)
    assert records == generate(40, seed=5) and records != generate(40, seed=6)
    space = PromptSpace()
    for tag in TAGS:
        mine = [r for r in records if r["tag"] == tag]
        assert len(mine) == min(40, num_distinct(tag, space))
        assert len({json.dumps(r, sort_keys=True) for r in mine}) == len(mine)
    for record in records:
        clauses = record["include"]
        assert all(c["class"] in GENEVAL_CLASSES for c in clauses)
        assert not any(c["class"] == "person" and "color" in c for c in clauses)
        if record["tag"] == "counting":
            (clause,) = clauses
            assert 2 <= clause["count"] <= 4
            assert record["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        if record["tag"] == "position":
            reference, subject = clauses
            relation = subject["position"][0]
            assert subject["position"] == [relation, 0] and "position" not in reference
            article = "an" if reference["class"][0] in "aeiou" else "a"
            assert record["prompt"].endswith(f"{relation} {article} {reference['class']}")
        if record["tag"] in ("two_object", "position", "color_attr"):
            assert clauses[0]["class"] != clauses[1]["class"]
        if record["tag"] == "color_attr":
            assert clauses[0]["color"] != clauses[1]["color"]
    assert counting("bus", 3)["prompt"] == "a photo of three buses"


@needs_geneval_sample
def test_prompts_cli_writes_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train.jsonl"
    assert prompts_main(["--out", str(out), "--num", "7", "--seed", "1"]) == 0
    assert read_metadata_jsonl(out, known_classes=GENEVAL_CLASSES) == generate(7, seed=1)
    assert prompts_main(["--validate", str(GENEVAL_SAMPLE)]) == 0
    assert "12 records" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        GENEVAL_SAMPLE.read_text().splitlines()[0]
        + "\n\n"
        + '{"tag": "colors", "include": [{"class": "cow"}]}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:3: include\[0\].count"):
        read_metadata_jsonl(bad)
    assert prompts_main(["--validate", str(bad)]) == 2
    # Shapes-world metadata is GenEval metadata too, over other classes.
    shapes_file = tmp_path / "shapes.jsonl"
    shapes_file.write_text(json.dumps(shapes_prompts.counting("triangle", 2)) + "\n")
    assert prompts_main(["--validate", str(shapes_file)]) == 2
    assert prompts_main(["--validate", str(shapes_file), "--any-class"]) == 0
    assert len(read_metadata_jsonl(shapes_file)) == 1
