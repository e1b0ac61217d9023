"""LLM layer: OpenAI-compatible async client, offline writer, templates, parsing, curation."""
