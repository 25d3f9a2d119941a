"""Tiny random-weight models with a family's real tokenizer, for real vLLM servers in tests.

The weights are noise (what the model writes is nonsense); everything vLLM derives from the files
is real: the tokenizer and its chat template, the vocabulary, BOS/EOS, the context window. Two layers,
head_dim 64 (the CPU attention backend does not support 16), max_position_embeddings 131072 so a
64K window is allowed.

Two halves:
- ``ensure_model(family, python)`` runs in the test process (the main venv): it fetches the
  tokenizer files with ``extproc.tokens.files``, and builds the model once into
  ``~/.cache/extproc-vllm/models/<family>-<hash of the inputs>`` by running this file with the vLLM
  venv's python (torch and transformers live only there). A second call finds the directory and
  returns at once.
- run as a script (``python tiny_model.py FAMILY TOKENIZER_DIR OUT_DIR``) it builds the model; it
  imports only what the vLLM venv has.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

# family -> architecture and the settings the real checkpoints use where they matter to vLLM
FAMILIES: dict[str, dict] = {
    "llama3": {"arch": "LlamaForCausalLM", "rope_theta": 500000.0},
    "llama3_1": {"arch": "LlamaForCausalLM", "rope_theta": 500000.0},
    "qwen3": {"arch": "Qwen3ForCausalLM", "rope_theta": 1000000.0},
}
SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,   # one 128K x 128 matrix instead of two: smaller file, less RSS
    "torch_dtype": "bfloat16",
}
SEED = 20240726
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def models_root() -> pathlib.Path:
    """``$EXTPROC_VLLM_MODELS``, else ``$XDG_CACHE_HOME/extproc-vllm/models`` (~/.cache)."""
    given = os.environ.get("EXTPROC_VLLM_MODELS")
    if given:
        return pathlib.Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "extproc-vllm" / "models"


def _inputs_key(family: str, tokenizer_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    # the recipe itself (the builder's code, not this file's prose: a docstring edit keeps the cache)
    h.update((inspect.getsource(build) + inspect.getsource(_token_id)).encode())
    h.update(json.dumps([family, FAMILIES[family], SHAPE, SEED], sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        h.update(hashlib.sha256((tokenizer_dir / name).read_bytes()).digest())
    return h.hexdigest()[:12]


def ensure_model(family: str, python: str | os.PathLike, log=print) -> pathlib.Path:
    """The model directory of ``family`` (built on first use with the vLLM venv's ``python``)."""
    from extproc.tokens.files import family_dir  # the main venv's side only

    if family not in FAMILIES:
        raise KeyError(f"no tiny model recipe for {family!r}; known: {', '.join(FAMILIES)}")
    tok = family_dir(family)
    root = models_root()
    target = root / f"{family}-{_inputs_key(family, tok)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same model
        if (target / "config.json").is_file():
            return target
        tmp = root / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        done = subprocess.run([str(python), __file__, family, str(tok), str(tmp)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"building the tiny {family} model failed (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        os.replace(tmp, target)  # config.json appears only with the whole directory
        log(f"realvllm: built tiny {family} model in {time.monotonic() - t0:.1f} s: {target}")
    return target


# -- the builder (vLLM venv) ---------------------------------------------------------------------

def _token_id(tokenizer: dict, config: dict, key: str) -> int | None:
    """The id of the tokenizer config's ``bos_token``/``eos_token`` (a string or an AddedToken dict)."""
    tok = config.get(key)
    if isinstance(tok, dict):
        tok = tok.get("content")
    if tok is None:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added["content"] == tok:
            return added["id"]
    vocab = tokenizer["model"]["vocab"]
    if tok in vocab:
        return vocab[tok]
    raise ValueError(f"{key} {tok!r} is not in tokenizer.json")


def build(family: str, tokenizer_dir: pathlib.Path, out: pathlib.Path) -> None:
    import torch
    import transformers

    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    ids = list(tokenizer["model"]["vocab"].values()) + [a["id"] for a in tokenizer.get("added_tokens", [])]
    vocab_size = max(ids) + 1
    bos = _token_id(tokenizer, tok_config, "bos_token")
    eos = _token_id(tokenizer, tok_config, "eos_token")
    pad = _token_id(tokenizer, tok_config, "pad_token")
    spec = FAMILIES[family]
    if spec["arch"] == "LlamaForCausalLM":
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        config_cls, model_cls = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    shape = dict(SHAPE)
    dtype = getattr(torch, shape.pop("torch_dtype"))
    config = config_cls(
        vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        architectures=[spec["arch"]], dtype=dtype, **shape,
    )
    torch.manual_seed(SEED)
    model = model_cls(config).to(dtype)
    model.eval()
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    gen = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    gen.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    if not (out / "config.json").is_file() or not list(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no config.json or safetensors into {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} FAMILY TOKENIZER_DIR OUT_DIR")
    build(sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
