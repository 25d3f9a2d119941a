"""``extproc serve``: the gRPC ext_proc service (and the ext_authz HTTP check endpoint) with health,
metrics, snapshots, the operator API (service/operator.py) and a graceful stop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from ..budget import BudgetRouter
from ..config import Config
from .check import CheckServer
from .metrics import Metrics
from .operator import add_to_server as add_operator_api
from .processor import ExtProcServicer, RequestEndsServicer
from .router import Router

log = logging.getLogger("extproc.service")
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
MAX_MESSAGE = 64 << 20  # an 8 MiB prompt with JSON escapes, with room


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Messages carry counts and names, never prompt text."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"t": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def write_snapshot(text: str, path: str) -> None:
    """Atomic write under a unique temporary name: a crash mid-write, or two writers, never
    leave half a snapshot."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".calibration-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_snapshot(budget: BudgetRouter, path: str) -> None:
    write_snapshot(json.dumps(budget.snapshot()), path)


def restore_snapshot(budget: BudgetRouter, path: str) -> bool:
    try:
        with open(path, "rb") as f:
            budget.restore_json(f.read())  # the operator API's RestoreCalibration validates the same way
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - a bad snapshot costs calibration, never the start
        log.warning("calibration snapshot %s not restored: %s", path, exc)
        return False


class Service:
    """The running service; ``start``/``stop`` for tests and ``run`` for the CLI."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.budget = BudgetRouter(config.budget)
        self.metrics = Metrics(self.budget.calibration_states)
        self.router = Router(self.budget, config.service, self.metrics)
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.check: CheckServer | None = None
        self._snapshot_task: asyncio.Task | None = None
        self._metrics_server = None

    async def start(self, grpc_address: str | None = None, metrics_address: str | None = "",
                    http_address: str | None = None) -> None:
        s = self.config.service
        if s.snapshot_path and restore_snapshot(self.budget, s.snapshot_path):
            log.info("calibration restored from %s", s.snapshot_path)
        maddr = s.metrics_address if metrics_address == "" else metrics_address
        if maddr:  # bound first: a taken port fails the start before anything else is running
            host, _, port = maddr.rpartition(":")
            try:
                self._metrics_server, _ = start_http_server(int(port), addr=host, registry=self.metrics.registry)
            except OSError as exc:
                raise OSError(f"cannot bind the metrics address {maddr}: {exc.strerror}") from None
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(self.router), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(RequestEndsServicer(self.router), self.server)
        add_operator_api(self.router, s.operator_api, self.server)
        address = grpc_address or s.grpc_address
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio's way of saying the address is taken or invalid
            self.port = 0
        if not self.port:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            raise OSError(f"cannot bind the gRPC address {address} (in use, or not an address of this host)")
        if s.routing_filter == "ext_authz":
            self.check = CheckServer(self.router)
            try:
                await self.check.start(http_address or s.http_address)
            except OSError:
                if self._metrics_server is not None:
                    self._metrics_server.shutdown()
                raise
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.snapshot_path:
            self._snapshot_task = asyncio.create_task(self._snapshot_loop())
        log.info("serving ext_proc on %s (port %d)%s, metrics on %s, pools %s, operator API %s%s",
                 grpc_address or s.grpc_address, self.port,
                 f", ext_authz checks on port {self.check.port}" if self.check else "", maddr or "-",
                 ",".join(f"{p.name}={p.max_context}" for p in self.budget.pools), s.operator_api,
                 " [shadow]" if s.shadow else "")

    async def _snapshot_loop(self) -> None:
        path = self.config.service.snapshot_path
        while True:
            await asyncio.sleep(self.config.service.snapshot_interval_s)
            try:
                # serialised on the loop (the calibrator is only touched there), written off it
                text = json.dumps(self.budget.snapshot())
                await asyncio.to_thread(write_snapshot, text, path)
            except Exception as exc:  # noqa: BLE001 - keep saving later; never stop the loop
                log.warning("calibration snapshot %s not saved: %s", path, exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new streams, let in-flight ones finish (up to the grace period), save."""
        s = self.config.service
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._snapshot_task:
            self._snapshot_task.cancel()
            try:
                await self._snapshot_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        grace = s.grace_period_s if grace is None else grace
        if self.check is not None:
            await self.check.stop(grace)
        if self.server:
            t0 = time.monotonic()
            await self.server.stop(grace)
            log.info("stopped after %.1fs", time.monotonic() - t0)
        if s.snapshot_path:
            try:
                save_snapshot(self.budget, s.snapshot_path)
                log.info("calibration saved to %s", s.snapshot_path)
            except OSError as exc:
                log.warning("calibration snapshot %s not saved: %s", s.snapshot_path, exc)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


def install_event_loop() -> None:
    """uvloop when installed: the gRPC service's per-message overhead is event-loop bound
    (measured ~10% less router CPU per request on an echo service)."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


async def run(config: Config) -> None:
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await service.stop()
