"""transfuse: choose, combine and measure fine-tuned models."""

from __future__ import annotations

__version__ = "0.1.0"
