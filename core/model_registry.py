"""The registry of served models: the entries medbatch ships (:mod:`core.served_models`) plus
those of the modules named by ``MEDBATCH_EXTRA_MODELS`` (a site's own model), and the lookups
every layer uses instead of naming a model."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from functools import cache
from typing import Any

from core.errors import ConfigurationError
from core.job_kinds import Flow
from core.served_models import BUILTIN, ServedModel
from core.settings import Settings, get_settings


@cache
def _registry(extra_modules: tuple[str, ...]) -> dict[str, ServedModel]:
    models = {m.name: m for m in BUILTIN}
    for module_name in extra_modules:
        try:
            module: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(
                f"MEDBATCH_EXTRA_MODELS names {module_name!r}, which cannot be imported: {exc}"
            ) from exc
        extra: Iterable[ServedModel] = getattr(module, "MODELS", ())
        for model in extra:
            if model.name in models:
                raise ConfigurationError(
                    f"{module_name} registers {model.name!r}, which is already registered"
                )
            models[model.name] = model
    return models


def _extra(settings: Settings | None) -> tuple[str, ...]:
    settings = settings or get_settings()
    return tuple(m.strip() for m in settings.extra_models.split(",") if m.strip())


def served_models(
    settings: Settings | None = None, *, flow: Flow | None = None
) -> list[ServedModel]:
    """Every served model (built in, then the extra ones), or those of one flow, in order."""
    return [m for m in _registry(_extra(settings)).values() if flow is None or m.flow == flow]


def served_model(name: str, settings: Settings | None = None) -> ServedModel:
    """The entry of ``name``; :class:`ConfigurationError` names the known ones otherwise."""
    models = _registry(_extra(settings))
    try:
        return models[name]
    except KeyError:
        raise ConfigurationError(
            f"no served model {name!r} is registered; known: {', '.join(models)}"
        ) from None


def ehr_models(settings: Settings | None = None) -> list[ServedModel]:
    """The EHR models every extract is scored with, in registry order."""
    return served_models(settings, flow="ehr")
