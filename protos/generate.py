"""Generate the Python stubs for reward.proto: ``python -m protos.generate [--out DIR]``.

The stubs are committed so that installing the package needs no code generator; a test regenerates
them into a temporary directory and fails if the committed ones differ (stale after a .proto edit).
Run from the repository root: the proto is compiled with ``-I .`` so that the generated gRPC module
imports ``protos.reward_pb2`` as a package-qualified module.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/reward.proto")
GENERATED = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile reward.proto into ``out_dir/protos/`` and return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_dir / "protos" / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "protos", help="where the stubs go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, args.out / path.name)
            print(f"wrote {args.out / path.name}")


if __name__ == "__main__":
    main()
