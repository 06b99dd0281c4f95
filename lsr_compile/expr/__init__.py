"""Stage 1: the LSR layer as TVM tensor expressions (``te.compute`` only, no schedules)."""
from .adapter import EXPRESSIONS, Expression

__all__ = ["EXPRESSIONS", "Expression"]
