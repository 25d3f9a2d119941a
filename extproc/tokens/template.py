"""A model's own Jinja chat template, rendered the way transformers (and so vLLM) renders it.

The environment matches ``transformers.utils.chat_template_utils._cached_compile_jinja_template``
(transformers 5.19, the one vLLM 0.32 ships with): ``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}`` tag;
a ``tojson`` filter that is ``json.dumps(x, ensure_ascii=False, indent=..., separators=...,
sort_keys=...)`` (Jinja's own escapes HTML characters); the globals ``raise_exception`` (raises a
template error) and ``strftime_now`` (``datetime.now().strftime``, local time). The variables a
template sees are those of ``render_jinja_template``: ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's named special tokens (``bos_token``, ``eos_token``, ...)
and the request's other template kwargs; ``continue_final_message`` is handled around the render
with transformers' tag trick, not passed to the template.

Bounded: besides Jinja's sandbox (no private attributes, ``range`` capped at 100,000 items),
``+``, ``*`` and ``**`` are intercepted so a template cannot build a string or list larger than
``max_chars``; integer arguments larger than that are refused by calls and filters (``center``,
``ljust``, ``indent``, ...); the rendered output is capped at ``max_chars``; and a watchdog interrupts
a render that runs longer than ``timeout`` seconds (nested loops over ``range``), raising
:class:`TemplateError` in the rendering thread. Recursion (recursive macros, deeply nested data)
ends in Python's RecursionError, reported as a TemplateError.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import itertools
import json
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

DEFAULT_MAX_CHARS = 1 << 26     # 64 Mi characters: far beyond any context window's prompt
DEFAULT_TIMEOUT = 30.0          # seconds of wall time one render may take: vLLM's own bound
                                # (VLLM_CHAT_TEMPLATE_RENDER_TIMEOUT), so a busy machine is no 400

CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


class TemplateError(ValueError):
    """The chat template (or the request given to it) fails where vLLM answers HTTP 400."""


class RenderTimeout(TemplateError):
    """A render ran longer than its time limit."""


class _Interrupt(BaseException):
    """Raised asynchronously inside a render that ran out of time (BaseException: templates'
    own exception handling, if any, cannot swallow it)."""


# -- the watchdog: one daemon thread interrupting renders past their deadline ---------------------

class _Watchdog:
    """Interrupts a rendering thread past its deadline with ``PyThreadState_SetAsyncExc``.

    The exception is delivered between two bytecodes of the thread, so pure-Python loops (what a
    compiled Jinja template is) stop; a single long C call finishes first. ``arm`` and ``disarm``
    cost a lock and a heap push; the thread sleeps until the earliest deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, int]] = []   # (deadline, ticket, thread id)
        self._active: dict[int, int] = {}                # ticket -> thread id
        self._fired: set[int] = set()
        self._tickets = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float) -> int:
        ticket = next(self._tickets)
        tid = threading.get_ident()
        with self._lock:
            self._active[ticket] = tid
            heapq.heappush(self._heap, (time.monotonic() + timeout, ticket, tid))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chat-template-watchdog",
                                                daemon=True)
                self._thread.start()
            if self._heap[0][1] == ticket:
                self._wake.notify()
        return ticket

    def disarm(self, ticket: int) -> bool:
        """Ends a render's watch; True when the watchdog had fired for it. A fired exception not
        yet delivered is cancelled here, so it cannot surface after the render."""
        with self._lock:
            tid = self._active.pop(ticket, None)
            fired = ticket in self._fired
            if fired:
                self._fired.discard(ticket)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
        del tid
        return fired

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][1] not in self._active or self._heap[0][0] <= now):
                    deadline, ticket, tid = heapq.heappop(self._heap)
                    if ticket in self._active and deadline <= now:
                        del self._active[ticket]
                        self._fired.add(ticket)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid),
                                                                   ctypes.py_object(_Interrupt))
                self._wake.wait(timeout=(self._heap[0][0] - now) if self._heap else None)


_WATCHDOG = _Watchdog()


# -- the environment ----------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): the body is
    rendered as it is; the mask itself is not needed to count."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _too_big(value: Any, limit: int) -> bool:
    return type(value) is int and not -limit <= value <= limit


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with size limits on what a template can build."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        for name, fn in list(self.filters.items()):
            self.filters[name] = self._bounded_filter(fn)

    def _bounded_filter(self, fn):
        limit = self.max_chars

        @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context / pass_environment ...)
        def bounded(*args, **kwargs):
            for a in itertools.chain(args, kwargs.values()):
                if _too_big(a, limit):
                    raise jinja2.exceptions.SecurityError(f"argument {a} too large")
            return fn(*args, **kwargs)

        return bounded

    def call_binop(self, context, operator, left, right):
        limit = self.max_chars
        if operator == "+":
            out = left + right
            if isinstance(out, (str, list, tuple)) and len(out) > limit:
                raise jinja2.exceptions.SecurityError("result of + too large")
            return out
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and type(n) is int and len(seq) * n > limit:
                    raise jinja2.exceptions.SecurityError("result of * too large")
            return left * right
        # "**"
        if type(left) is int and type(right) is int and right > 64 and abs(left) > 1:
            raise jinja2.exceptions.SecurityError("result of ** too large")
        return left ** right

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        limit = __self.max_chars
        for a in itertools.chain(args, kwargs.values()):
            if _too_big(a, limit):
                raise jinja2.exceptions.SecurityError(f"argument {a} too large")
        return super().call(__context, __obj, *args, **kwargs)


@functools.lru_cache(maxsize=8)
def environment(max_chars: int = DEFAULT_MAX_CHARS) -> _BoundedEnvironment:
    return _BoundedEnvironment(max_chars)


# -- what vLLM reads off a template's AST -------------------------------------------------------

def _name(node, varname: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == varname


def _attr(node, varname: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (_name(node.node, varname) and isinstance(node.arg, jinja2.nodes.Const)
                and node.arg.value == key)
    if isinstance(node, jinja2.nodes.Getattr):
        return _name(node.node, varname) and node.attr == key
    return False


def _access(node, varname: str, key: str | None = None) -> bool:
    """``var`` (or ``var[key]`` / ``var.key``), possibly filtered, tested or sliced."""
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _access(node.node, varname, key)
    if isinstance(node, jinja2.nodes.Test):
        return _access(node.node, varname, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _access(node.node, varname, key)
    return _attr(node, varname, key) if key else _name(node, varname)


def _aliases(root, varname: str) -> list[str]:
    """``varname`` and every variable assigned from it (``{% set msgs = messages[1:] %}``)."""
    out, queue, seen = [varname], deque([varname]), {varname}
    assigns = list(root.find_all(jinja2.nodes.Assign))
    while queue:
        v = queue.popleft()
        for a in assigns:
            if isinstance(a.target, jinja2.nodes.Name) and _access(a.node, v) and a.target.name not in seen:
                seen.add(a.target.name)
                out.append(a.target.name)
                queue.append(a.target.name)
    return out


def _message_vars(root) -> list[str]:
    names = _aliases(root, "messages")
    return [loop.target.name for loop in root.find_all(jinja2.nodes.For)
            if isinstance(loop.target, jinja2.nodes.Name) and any(_access(loop.iter, n) for n in names)]


def _loops_over_content(root) -> bool:
    """Whether the template iterates over a message's content (a list of parts): vLLM's test for
    the "openai" content format (vllm/renderers/hf.py ``_iter_nodes_assign_content_item``)."""
    message_vars = _message_vars(root)
    in_macro: set[int] = set()
    macro_params: dict[int, set[str]] = {}
    calls = list(root.find_all(jinja2.nodes.Call))
    for macro in root.find_all(jinja2.nodes.Macro):
        names = [a.name for a in macro.args]
        params: set[str] = set()
        for call in calls:
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            for i, arg in enumerate(call.args):
                if i < len(names) and any(_access(arg, m, "content") for m in message_vars):
                    params.add(names[i])
            for kw in call.kwargs:
                if kw.key in names and any(_access(kw.value, m, "content") for m in message_vars):
                    params.add(kw.key)
        for loop in macro.find_all(jinja2.nodes.For):
            in_macro.add(id(loop))
            if params:
                macro_params[id(loop)] = params
    for loop in root.find_all(jinja2.nodes.For):
        if any(_access(loop.iter, m, "content") for m in message_vars):
            return True
        it = loop.iter
        if isinstance(it, jinja2.nodes.Name):
            if it.name in macro_params.get(id(loop), ()):
                return True
            if id(loop) not in in_macro and it.name == "content":
                return True
    return False


class ChatTemplate:
    """One compiled chat template and what vLLM derives from its source."""

    def __init__(self, source: str, *, max_chars: int = DEFAULT_MAX_CHARS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if not isinstance(source, str):
            raise TypeError("a chat template is a string")
        env = environment(max_chars)
        try:
            self.template = env.from_string(source)
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template does not compile: {e}") from e
        self.source = source
        self.max_chars = max_chars
        self.timeout = timeout
        #: "openai" when the template loops over message content (parts stay a list of dicts),
        #: else "string" (text parts joined with "\n") — vLLM's auto-detected content format
        try:
            self.content_format = "openai" if _loops_over_content(ast) else "string"
        except Exception:
            self.content_format = "string"
        #: vLLM keeps "developer" messages only when the template names that role
        self.supports_developer = '"developer"' in source or "'developer'" in source
        #: the variables the template reads from outside (jinja2.meta)
        import jinja2.meta
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(ast))

    def render(self, messages: list[dict], *, tools: list | None = None,
               documents: list | None = None, add_generation_prompt: bool = False,
               continue_final_message: bool = False, variables: dict | None = None) -> str:
        """The prompt, as ``render_jinja_template`` makes it (one conversation)."""
        if not messages:
            raise TemplateError("Cannot apply chat template to an empty conversation. "
                                "Provide at least one message.")
        if continue_final_message and add_generation_prompt:
            raise TemplateError(
                "continue_final_message and add_generation_prompt are not compatible. Use "
                "continue_final_message when you want the model to continue the final message, "
                "and add_generation_prompt when you want to add a header that will prompt it to "
                "start a new assistant message instead.")
        if documents is not None and any(not isinstance(d, dict) for d in documents):
            raise TemplateError("Documents should be a list of dicts with 'title' and 'text' keys!")
        final_text = None
        if continue_final_message:
            messages = list(messages)
            last = dict(messages[-1])
            final = last.get("content")
            if final is None:
                raise TemplateError('continue_final_message is set but the final message has no '
                                    '"content" to continue!')
            if "content" not in self.source:
                raise TemplateError('continue_final_message is set to "content" but this is not '
                                    'an accepted field in the chat_template')
            if isinstance(final, (list, tuple)):
                parts = [dict(p) if isinstance(p, dict) else p for p in final]
                for p in reversed(parts):
                    if isinstance(p, dict) and "text" in p:
                        final_text = p["text"]
                        p["text"] = p["text"] + CONTINUE_TAG
                        break
                else:
                    raise TemplateError("continue_final_message is set but we could not find any "
                                        "text to continue in the final message!")
                last["content"] = parts
            else:
                final_text = final
                last["content"] = final + CONTINUE_TAG
            messages[-1] = last
        context = dict(variables or {})
        context.update(messages=messages, tools=tools, documents=documents,
                       add_generation_prompt=add_generation_prompt)
        out = self._generate(context)
        if continue_final_message:
            tag = CONTINUE_TAG.strip()
            if final_text.strip() not in out or tag not in out:
                raise TemplateError(
                    "continue_final_message is set but the final message does not appear in the "
                    "chat after applying the chat template! This can happen if the chat template "
                    "deletes portions of the final message.")
            at = out.rindex(tag)
            out = out[:at] if out[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else out[:at].rstrip()
        return out

    def _generate(self, context: dict) -> str:
        limit = self.max_chars
        chunks: list[str] = []
        size = 0
        ticket = _WATCHDOG.arm(self.timeout)
        try:
            try:
                for chunk in self.template.generate(context):
                    size += len(chunk)
                    if size > limit:
                        raise TemplateError(f"chat template output exceeds {limit} characters")
                    chunks.append(chunk)
            finally:
                fired = _WATCHDOG.disarm(ticket)
        except _Interrupt:
            raise RenderTimeout(f"chat template rendering timed out after {self.timeout} s") from None
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(str(e) or type(e).__name__) from e
        except RecursionError as e:
            raise TemplateError("chat template recursion too deep") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
                ZeroDivisionError, MemoryError) as e:
            # errors a template raises on unexpected input; vLLM answers these with a 400
            raise TemplateError(f"{type(e).__name__}: {e}") from e
        del fired
        return "".join(chunks)


def variables_of(source: str) -> frozenset[str]:
    """Undeclared variables of a template source (what it can read from the caller)."""
    import jinja2.meta
    return frozenset(jinja2.meta.find_undeclared_variables(environment().parse(source)))


def render_probe(template: ChatTemplate, messages: Iterable[dict], **kw) -> bool:
    """Whether ``template`` renders ``messages`` without a template error."""
    try:
        template.render(list(messages), **kw)
        return True
    except TemplateError:
        return False
