"""The committed operator API code is what grpcio-tools generates from protos/ now: regenerated
into a temporary folder, every file must match byte for byte."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

from extproc.service.genproto import GENERATED, PROTO_ROOT, PROTOS, ROOT, generate


def _pinned_tools_version() -> str:
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in doc["project"]["optional-dependencies"]["dev"] if d.startswith("grpcio-tools")]
    return pin.split("==", 1)[1].split(";")[0].strip()


def test_committed_stubs_are_what_the_protos_generate(tmp_path):
    installed = metadata.version("grpcio-tools")
    assert installed == _pinned_tools_version(), \
        f"grpcio-tools {installed} is installed, pyproject pins {_pinned_tools_version()}: pip install -e '.[dev]'"
    for written, name in zip(generate(tmp_path), GENERATED):
        committed = ROOT / name
        assert committed.is_file(), f"{name} is not committed: python -m extproc.service.genproto"
        assert written.read_bytes() == committed.read_bytes(), \
            f"{name} is stale against {', '.join(PROTOS)}: python -m extproc.service.genproto, then commit"


def test_a_changed_proto_is_caught(tmp_path):
    """The comparison above can fail: a proto with one more field generates other bytes."""
    import shutil

    protos = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, protos)
    proto = protos / PROTOS[0]
    proto.write_text(proto.read_text().replace("  string detail = 20;\n", "  string detail = 20;\n  int64 extra = 21;\n"))
    written = generate(tmp_path / "out", proto_root=protos)
    assert written[0].read_bytes() != (ROOT / GENERATED[0]).read_bytes()


def test_the_committed_stubs_import_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", "from extproc.operator.v1 import operator_pb2_grpc as g; "
                          "print(g.OperatorStub.__name__)"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "OperatorStub", out.stderr
