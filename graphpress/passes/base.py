"""Pass protocol, registry and configuration round-tripping.

A pass is a class registered under a kebab-case name, configured by a frozen dataclass with a
``version`` field, and called on a :class:`~graphpress.ir.graph.Graph` to return a
:class:`PassResult`. It declares ``exact = True`` (the pipeline checks allclose against the
previous graph) or ``exact = False`` (the pipeline checks the budget the config declares:
``min_sqnr_db`` and/or ``max_kl``).

Configs round-trip through plain dicts (YAML/JSON): :func:`config_to_dict` and
:func:`config_from_dict`, which rejects a misspelled key with one line naming the pass, the key
and the closest valid key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

from graphpress.errors import PassError
from graphpress.ir.graph import Graph


@dataclass
class PassResult:
    """What a pass returns: the rewritten graph, whether it changed, and counts for the report.

    ``stats`` should say what the rule did *and* why it did not fire elsewhere, e.g.
    ``{"folded": 19, "skipped": {"conv output has other users": 1}}``.
    """

    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """The protocol every registered pass follows."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    Config: ClassVar[type]
    config: Any

    def __call__(self, graph: Graph) -> PassResult: ...


_REGISTRY: dict[str, type] = {}

# ---------------------------------------------------------------------------- progress
# A pass that loops over layers for seconds or minutes calls report_progress(i, n, what); the
# caller (the CLI, through graphpress.api.compress) listens with progress_hook. A context
# variable, not a Pipeline argument, so passes keep their one-argument __call__ and a pass run
# outside any pipeline reports to nobody at no cost.
ProgressHook = Callable[[int, int, str], None]
_PROGRESS: contextvars.ContextVar[ProgressHook | None] = contextvars.ContextVar("graphpress_pass_progress", default=None)


def report_progress(done: int, total: int, what: str = "") -> None:
    """Tell the listener (if any) that a pass has finished ``done`` of ``total`` steps.

    Parameters
    ----------
    done : int
        Steps finished so far (0 before the first one).
    total : int
        Steps in all (e.g. the layers the pass visits).
    what : str
        What the step is (a layer name), shown next to ``done/total``.
    """
    hook = _PROGRESS.get()
    if hook is not None:
        hook(int(done), int(total), str(what))


def progress_iter(items: typing.Iterable[Any], what: Callable[[Any], str] = lambda x: str(getattr(x, "name", ""))) -> Iterator[Any]:
    """Yield ``items`` and report ``i/n`` (with ``what(item)``) before each: a per-layer loop's
    progress in one line, ``for layer in progress_iter(layers):``."""
    items = list(items)
    for i, item in enumerate(items):
        report_progress(i, len(items), what(item))
        yield item
    report_progress(len(items), len(items), "")


@contextlib.contextmanager
def progress_hook(hook: ProgressHook | None) -> Iterator[None]:
    """Within the block, :func:`report_progress` calls ``hook(done, total, what)``."""
    token = _PROGRESS.set(hook)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def register(name: str):
    """Class decorator: register a pass under a kebab-case ``name``."""
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass names are kebab-case, got {name!r}")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass {name!r} registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
        if not dataclasses.is_dataclass(cls.Config) or not cls.Config.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__}.Config must be a frozen dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin_passes() -> None:
    # Importing the families registers their passes; done lazily so `ir` never imports passes.
    import graphpress.passes.circulant  # noqa: F401
    import graphpress.passes.cleanup  # noqa: F401
    import graphpress.passes.fusion  # noqa: F401
    import graphpress.passes.polyact  # noqa: F401
    import graphpress.passes.prune  # noqa: F401
    import graphpress.passes.quant  # noqa: F401
    import graphpress.passes.sparsity  # noqa: F401


def registered() -> dict[str, type]:
    """All registered passes by name, sorted."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type:
    """The pass class registered as ``name``; unknown names get a one-line error with a suggestion."""
    passes = registered()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise PassError(f"unknown pass '{name}': {hint}run 'compress passes' to list them")
    return passes[name]


def make_pass(name: str, config: dict[str, Any] | Any | None = None) -> Pass:
    """Instantiate pass ``name`` with ``config`` (a dict from YAML/JSON or a Config instance)."""
    cls = get_pass_class(name)
    if config is None or isinstance(config, dict):
        config = config_from_dict(cls.Config, config or {}, owner=name)
    elif not isinstance(config, cls.Config):
        raise PassError(f"pass '{name}': config must be {cls.Config.__name__} or a dict, got {type(config).__name__}")
    return cls(config)


def describe(cls: type) -> str:
    """First line of a pass's module docstring (the math / purpose summary)."""
    import sys

    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


# ---------------------------------------------------------------------------- configs
# The dict <-> frozen-dataclass code is shared with the backends' options: graphpress.config.
from graphpress.config import config_from_dict as _shared_config_from_dict  # noqa: E402
from graphpress.config import config_to_dict  # noqa: E402,F401 -- re-exported


def config_from_dict(cls: type, data: dict[str, Any], *, owner: str = "") -> Any:
    """Build config ``cls`` from ``data``; misspelled keys and wrong types are one-line errors."""
    owner = owner or cls.__name__
    if not isinstance(data, dict):
        raise PassError(f"pass '{owner}': config must be a mapping of options, got {type(data).__name__}")
    return _shared_config_from_dict(cls, data, owner=f"pass '{owner}'", error=PassError)


# ---------------------------------------------------------------------------- end configs
