"""Cost model: measured size and latency; analytical FLOPs/bytes/activations join here."""

from .latency import LatencyReport, SublayerLatency, measure_latency
from .size import SizeReport, measure_size

__all__ = ["LatencyReport", "SizeReport", "SublayerLatency", "measure_latency", "measure_size"]
