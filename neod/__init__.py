"""neod: an LLM serving daemon that offloads part of decoding attention to the host CPU (NEO)."""

__version__ = "0.1.0"
