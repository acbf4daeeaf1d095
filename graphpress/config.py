"""Frozen config dataclasses to and from plain dicts (YAML / JSON / command-line values).

Pass configs (:mod:`graphpress.passes.base`) and backend options (:mod:`graphpress.backends`)
are both frozen dataclasses with a ``version`` field, built from user dicts by
:func:`config_from_dict`: a misspelled key is one line naming the owner, the key and the closest
valid key; a value of the wrong type is one line naming the owner, the key and the type wanted.

This module sits just above :mod:`graphpress.errors` in the layering and imports neither torch
nor any other graphpress layer, so every layer (and the torch-free artifact runtime) can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

from graphpress.errors import GraphpressError


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a plain dict (tuples become lists) for YAML/JSON.

    Parameters
    ----------
    config : dataclass instance

    Returns
    -------
    dict
        Field name -> plain value; :func:`config_from_dict` rebuilds an equal config from it.
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(config)


def config_from_dict(cls: type, data: Any, *, owner: str, error: type[GraphpressError] = GraphpressError) -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, refusing unknown keys and wrong types.

    Parameters
    ----------
    cls : type
        A dataclass; a ``version`` field, when present, is the newest config version this code
        reads (a larger ``version`` in ``data`` is refused: upgrade graphpress).
    data : dict
        Option name -> value, as YAML / JSON / the command line gives them.
    owner : str
        Who the options belong to, as the message should name it, e.g. ``"pass 'prune-weights'"``
        or ``"backend 'he'"``.
    error : type
        The :class:`~graphpress.errors.GraphpressError` subclass to raise.

    Returns
    -------
    instance of ``cls``

    Raises
    ------
    GraphpressError (``error``)
        One line, e.g. ``backend 'he': unknown option 'encodng': did you mean 'encoding'?`` or
        ``backend 'he': option 'act_bits': expected an integer, got 'eight'``.
    """
    if not isinstance(data, dict):
        raise error(f"{owner}: options must be a mapping of option names to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid options: {', '.join(fields)}"
            raise error(f"{owner}: unknown option '{key}': {hint}")
        kwargs[key] = coerce(value, hints.get(key, Any), f"{owner}: option '{key}'", error)
    default_version = fields["version"].default if "version" in fields else None
    version = kwargs.get("version", default_version)
    if version is not None and default_version is not None and version > default_version:
        raise error(f"{owner}: config version {version} is newer than this graphpress supports ({default_version}); upgrade graphpress")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str, error: type[GraphpressError] = GraphpressError) -> Any:
    """``value`` checked against the type annotation ``hint`` (lists become tuples where the
    field is a tuple, ints become floats where it is a float, a path becomes its string where it
    is a string); anything else is one ``error`` line starting with ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, error)
            except error as e:
                errors.append(str(e))
        raise error(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise error(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        seq = [coerce(v, inner, where, error) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {value!r}")
        return value
    return value


__all__ = ["coerce", "config_from_dict", "config_to_dict"]
