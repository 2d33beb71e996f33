"""Traces: what a generation recorded, how to record it, and how to save and reopen it."""

from .recording import Recording, TraceBudgetError
from .trace import AttentionView, Trace, TraceError

__all__ = ["AttentionView", "Recording", "Trace", "TraceBudgetError", "TraceError"]
