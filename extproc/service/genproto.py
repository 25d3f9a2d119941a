"""Regenerate the operator API's Python code from ``protos/`` with grpcio-tools (a dev dependency,
pinned in pyproject.toml so that every checkout generates the same bytes):

    python -m extproc.service.genproto

The proto path mirrors the Python package (``protos/extproc/operator/v1/operator.proto`` →
``extproc/operator/v1/operator_pb2*.py``), so the generated ``_grpc`` module's absolute import
resolves inside this package. tests/service/test_genproto.py regenerates into a temporary folder
and fails when the committed files differ.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTOS = ("extproc/operator/v1/operator.proto",)
GENERATED = ("extproc/operator/v1/operator_pb2.py", "extproc/operator/v1/operator_pb2.pyi",
             "extproc/operator/v1/operator_pb2_grpc.py")


def generate(out_dir: pathlib.Path, proto_root: pathlib.Path = PROTO_ROOT) -> list[pathlib.Path]:
    """Write the generated modules under ``out_dir`` (the repository root to refresh them);
    returns their paths. RuntimeError naming the cause when protoc fails."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("grpcio-tools is not installed: pip install -e '.[dev]'") from None
    missing = [p for p in PROTOS if not (proto_root / p).is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found under {proto_root} (run from a source checkout)")
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"--proto_path={proto_root}", f"--python_out={out_dir}",
                        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                        *(str(proto_root / p) for p in PROTOS)])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}); its message is above")
    return [out_dir / g for g in GENERATED]


def main() -> int:
    try:
        written = generate(ROOT)
    except RuntimeError as exc:
        print(f"genproto: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
