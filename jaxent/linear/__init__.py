"""Fused output projection + cross-entropy for large vocabularies (SPEC §5)."""

from .api import linear_cross_entropy as linear_cross_entropy

__all__ = ["linear_cross_entropy"]
