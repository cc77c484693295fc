"""Typed errors for bad input. Library code raises these; only the CLI prints them and exits."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-sentence errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class LayerwiseError(Exception):
    """Base class: the message is one complete sentence a user can act on."""


class ModelNotFoundError(LayerwiseError):
    """A model spec names nothing we can load."""


class UnsupportedArchitectureError(LayerwiseError):
    """A structural operation was asked of a model family no adapter handles."""


class BudgetError(LayerwiseError):
    """A budget is out of range or cannot be met."""


class PlanError(LayerwiseError):
    """A plan is malformed or does not fit the model it is applied to."""


class DataError(LayerwiseError):
    """Calibration or evaluation data is missing or too short."""


class OutputExistsError(LayerwiseError):
    """The output directory already exists and --overwrite was not given."""


class UnknownNameError(LayerwiseError):
    """A registry was asked for a name it does not hold."""


class SettingsError(LayerwiseError):
    """A run setting (window length, limits, latency setting, ...) is out of range."""


class EngineError(LayerwiseError):
    """An inference engine (llama.cpp) is missing, cannot run here, or rejected a file."""


class ExportError(LayerwiseError):
    """A model or plan cannot be expressed in the requested deployment format."""


class TokenizerError(LayerwiseError):
    """A model's tokenizer cannot be loaded, or fails to encode the text it is given."""


class OutputWriteError(LayerwiseError):
    """The disk refused a write (full, read-only, no permission); nothing half-written was left behind."""


class HealInterrupted(LayerwiseError):
    """Healing was interrupted (Ctrl-C); a checkpoint was kept and ``--resume`` continues from it."""
