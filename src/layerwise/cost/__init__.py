"""Cost model: measured size and latency; analytical FLOPs/bytes/activations join here."""

from .latency import LatencyReport, SublayerLatency, measure_latency
from .latency_table import LatencyTable, measure_latency_table
from .size import SizeReport, measure_size

__all__ = ["LatencyReport", "LatencyTable", "measure_latency_table", "SizeReport", "SublayerLatency", "measure_latency", "measure_size"]
