"""Exact prompt token counts the way vLLM computes them: the model's own chat template (jinja2)
over its real tokenizer (Hugging Face ``tokenizers`` on ``tokenizer.json``)."""
