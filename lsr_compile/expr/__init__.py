"""Stage 1: the LSR layer as TVM tensor expressions (``te.compute`` only; schedules come from schedules/)."""
from . import adapter, kron, mixed
from .adapter import GENERIC, Expression

EXPRESSIONS = {**adapter.EXPRESSIONS, **mixed.EXPRESSIONS}

__all__ = ["EXPRESSIONS", "GENERIC", "Expression", "kron"]
