"""Stage 3: tuning — device fingerprints, timing, and the search that writes tuning logs."""
from .search import TuningError, shapes_of, tune

__all__ = ["TuningError", "shapes_of", "tune"]
