"""batchlab: train by mini-batches with exact metrics, and measure how batch size shapes training."""

from __future__ import annotations

__version__ = "0.1.0"
