"""The state of one request while it decodes: see inference/engine/sequence.py (kept importable here)."""

from .engine.sequence import Sequence, SequenceStatus

__all__ = ["Sequence", "SequenceStatus"]
