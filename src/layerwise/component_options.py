"""Options a component declares for itself (a structure, an allocator), as a pydantic model whose fields become
CLI options and recipe keys of `plan` and `compress`; this module depends on nothing else in layerwise."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field

F = TypeVar("F", bound=Callable[..., Any])


def option(help: str, flags: str | None = None, param: str | None = None, budget: bool = False) -> Any:
    """One option: its help text, its CLI flag(s) when not ``--field-name``, the name of the component's
    parameter it sets when that differs, and whether it is a budget (read by ``Structure.budget``)."""
    return Field(None, description=help, json_schema_extra={"flags": flags, "param": param, "budget": budget})


class ComponentOptions(BaseModel):
    """Every field optional (unset: the component's default)."""

    model_config = ConfigDict(extra="forbid")


def declares(options: type[ComponentOptions]) -> Callable[[F], F]:
    """Decorator: the component (an allocator function) takes the options of ``options``."""

    def decorate(component: F) -> F:
        component.options = options  # type: ignore[attr-defined]
        return component

    return decorate
