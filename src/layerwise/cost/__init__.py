"""Cost model: measured size now; analytical FLOPs/bytes/activations and latency join here."""

from .size import SizeReport, measure_size

__all__ = ["SizeReport", "measure_size"]
