"""Deployment formats: GGUF files that llama.cpp (and Ollama, LM Studio, llama-cpp-python) run."""

from .gguf_export import ExportReport, check_exportable, check_structure_exportable, export_gguf

__all__ = ["ExportReport", "check_exportable", "check_structure_exportable", "export_gguf"]
