"""The committed stubs are exactly what `make protos` generates from reward.proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import GENERATED, ROOT, generate


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    for fresh in generate(tmp_path):
        committed = ROOT / "protos" / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run `make protos`"
    assert {p.name for p in (tmp_path / "protos").iterdir()} == set(GENERATED)


def test_no_pickle_on_the_wire() -> None:
    """Every field of the contract is a typed scalar, bytes of an image, or JSON text."""
    from protos import reward_pb2

    for message in reward_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.type == field.TYPE_BYTES:
                assert (message.name, field.name) == ("Image", "data"), (message.name, field.name)
    sources = [p for p in (ROOT / "services").rglob("*.py")] + [p for p in (ROOT / "protos").glob("*.py")]
    for path in sources:
        text = path.read_text()
        for banned in ("import pickle", "from pickle", "import dill", "cloudpickle", "torch.load(request"):
            assert banned not in text, f"{path} uses {banned}"
