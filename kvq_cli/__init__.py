"""kvq: adaptive per-token KV-cache quantization for small LLMs on-device."""

__version__ = "0.1.0"
