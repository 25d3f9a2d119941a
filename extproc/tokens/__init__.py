"""Exact prompt token counts the way vLLM computes them: the model's own chat template (jinja2,
rendered as transformers renders it) over its real tokenizer (Hugging Face ``tokenizers`` on
``tokenizer.json``).

    from extproc.tokens import TokenCounter, counter_for, TemplateError
    c = counter_for("llama3_1")                 # built-in family, memoised
    c.count_chat([{"role": "user", "content": "hi"}])
    c.count_request("chat", body)               # one count per prompt the engine runs
"""

from .counter import (APIS, TokenCounter, counter_for, normalize_tools, prepare_messages)
from .files import family_for_model
from .template import ChatTemplate, RenderTimeout, TemplateError

__all__ = ["APIS", "ChatTemplate", "RenderTimeout", "TemplateError", "TokenCounter", "counter_for", "family_for_model",
           "normalize_tools", "prepare_messages"]
