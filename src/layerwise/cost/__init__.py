"""Cost model: measured size and latency; analytical FLOPs/bytes/activations join here."""

from .latency import LatencyReport, PairedLatency, SublayerLatency, measure_latency, measure_paired_latency
from .latency_table import LatencyTable
from .size import SizeReport, measure_size

__all__ = ["LatencyReport", "LatencyTable", "PairedLatency", "measure_paired_latency", "SizeReport", "SublayerLatency", "measure_latency", "measure_size"]
