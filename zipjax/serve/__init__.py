"""Serving: continuous batching over a paged KV cache behind an OpenAI-compatible HTTP server (`zipjax serve`)."""
