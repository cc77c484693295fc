"""Healing's command-line options, generated from ``HealSetting``'s fields (flags ``--heal-<field>``, the method
``--heal``), so `compress --heal` and `layerwise heal` take the same options with the same help."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional, get_args

import typer
from pydantic import ValidationError

from .config import HealSetting
from .errors import SettingsError

PANEL = "Healing"


def heal_flag(name: str) -> str:
    """The CLI flag of HealSetting field ``name``."""
    return "--heal" if name == "method" else "--heal-" + name.replace("_", "-")


def heal_parameters() -> list[inspect.Parameter]:
    """Every HealSetting field as a typer keyword parameter (default None: unset)."""
    parameters = []
    for name, field in HealSetting.model_fields.items():
        kinds = [t for t in get_args(field.annotation) if t is not type(None)] or [field.annotation]
        kind = kinds[0]
        flags = heal_flag(name)
        if kind is bool:
            flags = f"{flags}/--no-{flags[2:]}"
        help_text = f"{field.description or ''} (default {field.default})".strip()
        annotation = Annotated[Optional[kind], typer.Option(flags, help=help_text, show_default=False,
                                                            rich_help_panel=PANEL)]
        parameters.append(inspect.Parameter(f"heal_{name}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=annotation))
    return parameters


def gather_heal(values: dict[str, Any], required: bool) -> Optional[HealSetting]:
    """The HealSetting of one command call (its options taken out of ``values``): None when healing was not
    asked for (``--heal`` absent and not ``required``); options without ``--heal`` are refused."""
    given = {name: values.pop(f"heal_{name}") for name in HealSetting.model_fields}
    given = {name: value for name, value in given.items() if value is not None}
    if not required and "method" not in given:
        if given:
            raise SettingsError(f"{heal_flag(next(iter(given)))} sets healing, which needs --heal kd|lm|lora.")
        return None
    try:
        return HealSetting(**{name: str(value) if name == "train_text" else value for name, value in given.items()})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "method"
        message = error["msg"].removeprefix("Value error, ")
        raise SettingsError(f"Invalid {heal_flag(name)}: {message[0].lower()}{message[1:]}.") from None
