"""gcache: multi-agent LLM reasoning through KV-caches along a learned communication graph."""

__version__ = "0.1.0"
