"""Workloads for the fleet simulator: arrival times with prompt and output lengths.

A workload is three parallel arrays sorted by arrival. It comes from a real trace (Azure LLM
inference 2023 code/conversation, Mooncake conversation; see ../shared/data/README.md) time-scaled to
a target rate, or from a Poisson process over a trace's lengths. Pure: reading a trace is the only I/O,
and it is kept to ``load_trace``.

Time-scaling keeps the trace's burstiness: inter-arrival gaps are multiplied by one factor so the mean
rate is the target. A trace shorter than the requested count is tiled (copies laid end to end, each
starting one mean gap after the previous copy ends), so a one-hour trace can drive a long run without
inventing lengths it does not have.
"""

from __future__ import annotations

import datetime as _dt
import pathlib
from dataclasses import dataclass

import numpy as np
import orjson

SHARED_TRACES = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "traces"

TRACES = {
    "azure-conv": "azure_llm_2023_conv.csv",
    "azure-code": "azure_llm_2023_code.csv",
    "mooncake": "mooncake_conversation.jsonl",
}


class TraceUnavailable(FileNotFoundError):
    """The shared trace files are not on this machine."""


@dataclass(frozen=True)
class Trace:
    """A trace as recorded: seconds from its first arrival, prompt tokens, output tokens."""

    name: str
    times: np.ndarray  # float64 seconds, sorted
    prompt: np.ndarray  # int64
    output: np.ndarray  # int64

    @property
    def duration_s(self) -> float:
        return float(self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0

    @property
    def rate(self) -> float:
        return (len(self.times) - 1) / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Workload:
    """What the simulator replays: arrivals (s, sorted), prompt and output tokens per request."""

    name: str
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def total(self) -> np.ndarray:
        return self.prompt + self.output

    @property
    def rate(self) -> float:
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else 0.0

    def subset(self, mask: np.ndarray, name: str | None = None) -> Workload:
        return Workload(name or self.name, self.arrival[mask], self.prompt[mask], self.output[mask])


def trace_dir(directory: str | pathlib.Path | None = None) -> pathlib.Path:
    path = pathlib.Path(directory) if directory else SHARED_TRACES
    if not path.is_dir():
        raise TraceUnavailable(f"trace directory {path} is absent (the shared data is not on this machine)")
    return path


def load_trace(name: str, directory: str | pathlib.Path | None = None) -> Trace:
    """One of ``TRACES`` by name, or a path to a file of the same format."""
    if name in TRACES:
        path = trace_dir(directory) / TRACES[name]
    else:
        path = pathlib.Path(name)
    if not path.is_file():
        raise TraceUnavailable(f"trace {name!r}: {path} not found (known names: {', '.join(TRACES)})")
    if path.suffix == ".jsonl":
        times, prompt, output = _read_mooncake(path)
    else:
        times, prompt, output = _read_azure(path)
    order = np.argsort(times, kind="stable")
    times = times[order] - times[order][0]
    return Trace(path.stem if name not in TRACES else name, times, prompt[order], output[order])


def _read_azure(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times, prompt, output = [], [], []
    with path.open() as f:
        header = f.readline().strip().split(",")
        if header[:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path}: expected Azure trace columns TIMESTAMP,ContextTokens,GeneratedTokens")
        epoch = None
        for line in f:
            stamp, ctx, gen = line.rstrip("\n").split(",")[:3]
            # 7 fractional digits: the first 26 characters are what datetime can parse.
            t = _dt.datetime.fromisoformat(stamp[:26]).timestamp()
            epoch = t if epoch is None else epoch
            times.append(t - epoch)
            prompt.append(int(ctx))
            output.append(int(gen))
    return np.array(times), np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64)


def _read_mooncake(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times, prompt, output = [], [], []
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                row = orjson.loads(line)
                times.append(row["timestamp"] / 1000.0)
                prompt.append(int(row["input_length"]))
                output.append(int(row["output_length"]))
    return np.array(times), np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64)


def from_trace(trace: Trace, *, rate: float | None = None, count: int | None = None,
               min_output: int = 1) -> Workload:
    """The trace's own arrivals, gaps scaled so the mean rate is ``rate`` (req/s), tiled to ``count``.

    Output lengths below ``min_output`` are raised to it: a request generates at least one token."""
    n = len(trace.times)
    count = n if count is None else count
    if count < 1 or n < 2:
        raise ValueError("a workload needs at least one request from a trace of two or more")
    scale = 1.0 if rate is None else trace.rate / rate
    gaps = np.diff(trace.times) * scale
    mean_gap = float(gaps.mean())
    copies = -(-count // n)
    gap_all = np.concatenate([np.concatenate([[mean_gap], gaps])] * copies)[:count]
    gap_all[0] = 0.0
    arrival = np.cumsum(gap_all)
    idx = np.arange(count) % n
    return Workload(trace.name, arrival, trace.prompt[idx].copy(),
                    np.maximum(trace.output[idx], min_output))


def poisson(trace: Trace, *, rate: float, count: int, seed: int = 0, min_output: int = 1) -> Workload:
    """Poisson arrivals at ``rate`` carrying lengths drawn (with replacement) from the trace."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0 / rate, count))
    arrival -= arrival[0]
    idx = rng.integers(0, len(trace.prompt), count)
    return Workload(f"{trace.name}-poisson", arrival, trace.prompt[idx].copy(),
                    np.maximum(trace.output[idx], min_output))


def synthetic(arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, name: str = "synthetic") -> Workload:
    """A workload from arrays (tests, closed-form checks)."""
    order = np.argsort(arrival, kind="stable")
    return Workload(name, np.asarray(arrival, float)[order], np.asarray(prompt, np.int64)[order],
                    np.maximum(np.asarray(output, np.int64)[order], 1))
