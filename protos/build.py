"""Regenerate the Python code for the ``*.proto`` files in this folder.

Usage::

    python -m accordion.protos.build            # writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py next to the .proto files
    python -m accordion.protos.build --out DIR  # writes them into DIR instead (the freshness test does this)
    python -m accordion.protos.build --check    # exit 1 if the committed files are stale

The folder ``protos/`` is installed as the package ``accordion.protos``, so generated modules must import each other
as ``accordion.protos.xxx_pb2``. protoc derives import paths from the proto's path relative to the ``-I`` root, so we
copy the ``.proto`` files into a temporary tree laid out as ``accordion/protos/<file>.proto`` and compile from there
with ``-I <tmp>``. The generated files are committed and must never be edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_PATH = Path("accordion") / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(src: Path = PROTO_DIR) -> list[Path]:
    return sorted(src.glob("*.proto"))


def generated_names(src: Path = PROTO_DIR) -> list[str]:
    return [p.stem + suf for p in proto_files(src) for suf in GENERATED_SUFFIXES]


def build(out_dir: Path | None = None, src: Path = PROTO_DIR) -> list[Path]:
    """Compile every ``*.proto`` in ``src`` and write the generated modules into ``out_dir`` (default ``src``)."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir) if out_dir is not None else src
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files(src)
    if not protos:
        raise SystemExit(f"no .proto files in {src}")
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="accordion-protos-") as tmp:
        tmp_root = Path(tmp)
        in_root = tmp_root / "in"
        gen_root = tmp_root / "gen"
        (in_root / PACKAGE_PATH).mkdir(parents=True)
        gen_root.mkdir()
        rel = []
        for p in protos:
            shutil.copyfile(p, in_root / PACKAGE_PATH / p.name)
            rel.append(str(PACKAGE_PATH / p.name))
        args = [
            "grpc_tools.protoc",
            f"-I{in_root}",
            f"-I{well_known}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            *rel,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        written = []
        for p in protos:
            for suf in GENERATED_SUFFIXES:
                name = p.stem + suf
                shutil.copyfile(gen_root / PACKAGE_PATH / name, out_dir / name)
                written.append(out_dir / name)
    return written


def stale_files(src: Path = PROTO_DIR) -> list[str]:
    """Names of generated files that are missing or differ from a fresh build."""
    with tempfile.TemporaryDirectory(prefix="accordion-protos-check-") as tmp:
        build(Path(tmp), src)
        return [
            name
            for name in generated_names(src)
            if not (src / name).exists() or not filecmp.cmp(src / name, Path(tmp) / name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m accordion.protos.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: next to the .proto files)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed generated files are stale")
    ns = ap.parse_args(argv)
    if ns.check:
        stale = stale_files()
        if stale:
            print("stale generated files (run `python -m accordion.protos.build`): " + ", ".join(stale))
            return 1
        print("generated files are up to date")
        return 0
    for path in build(ns.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
