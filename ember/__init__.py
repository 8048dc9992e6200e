"""ember: reusing and shipping LLM KV caches (rollout prefill reuse, cache-to-cache communication)."""

__version__ = "0.1.0"
