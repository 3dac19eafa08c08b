"""Autoregressive generation for every memlm model (public home of the one loop).

The loop lives in `memlm/models/generation.py` so that `MemLM.generate` can call it
without importing upwards; this module is where users and tools import it from.
"""

from memlm.models.generation import Decoding, generate, sample_next

__all__ = ["Decoding", "generate", "sample_next"]
