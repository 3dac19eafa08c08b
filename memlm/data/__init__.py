"""Data: tokenizers, corpora (text -> token memmap), batch sources, generated tasks."""

from memlm.data.batches import Batch, BatchSource, RandomWindows, StreamRows

__all__ = ["Batch", "BatchSource", "RandomWindows", "StreamRows"]
