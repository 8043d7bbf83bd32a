"""Regenerate the Python stubs of protos/meshserve/v1 into services/meshserve/v1 (the `meshserve.v1` package).

Usage: python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "services" / "meshserve" / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs into out_dir (replacing what is there) and returns the files written."""
    protos = sorted(PROTO_ROOT.glob("meshserve/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / "meshserve" / "v1"
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*_pb2*"):
            old.unlink()
        written = []
        for path in sorted(generated.iterdir()):
            target = out_dir / path.name
            shutil.copyfile(path, target)
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC stubs of protos/meshserve/v1 (scripts/gen_protos.py). Do not edit."""\n')
    return [*written, init]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out == DEFAULT_OUT else path, file=sys.stderr)


if __name__ == "__main__":
    main()
