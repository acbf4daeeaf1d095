"""One layer selector for every pass: ``targets`` / ``ignore`` (and the older ``skip``), checked one way.

Every pass that rewrites layers one by one (``quantize-layerwise``, ``awq-scale``,
``quantize-embeddings``, ``dequantize-at-load``, ``prune-weights``, ``store-sparse``,
``prune-channels``, ``sparsify-activations``, ``block-circulant``, ``circulant-search``) takes
the same three options:

``targets``
    The layers the pass may touch; empty (the default) means every eligible layer.
``ignore``
    Layers left alone even when ``targets`` names them (``ignore`` beats ``targets``).
``skip``
    The older spelling of ``ignore``, kept for existing recipes: **exact layer names only**
    (a ``skip`` entry is never read as a regex or an op family).

Each entry of ``targets`` / ``ignore`` is one of (the convention llm-compressor and torchao users know):

``re:<regex>``
    A regex that must match the **whole** layer name (``re.fullmatch``), e.g.
    ``re:layers\\.\\d+\\.attention\\.w[qkv]``. Full match, not search: ``re:fc`` does not select
    ``fc1``; write ``re:fc.*`` for a prefix.
``op:<family>``
    An op family of :mod:`graphpress.ir.opsets` by its lowercase name (``op:linear``,
    ``op:conv``, ``op:linear_like``): every layer whose node calls an op of that family.
``<family>``
    The same without the prefix (``linear``, ``conv``), unless a layer has exactly that name:
    an exact layer name always wins over a family (write ``op:conv`` to mean the family then).
``<name>``
    An exact layer name (:mod:`graphpress.ir.names`: source module path, ``#k`` for the k-th
    repeated call).

Validation happens twice, both before any work: the config checks the syntax (a regex that does
not compile, an ``op:`` family that does not exist) when it is built, and :meth:`Selector.resolve`
checks the names against the graph's layers when the pass runs. An exact name that is no layer,
or a ``targets`` entry that selects nothing, is one :class:`~graphpress.errors.PassError` line:
``pass 'quantize-layerwise': option 'skip': names unknown layer 'fcc2': did you mean 'fc2'?``
(or the eligible layers when nothing is close). A pattern in ``ignore`` that matches nothing is
allowed, so one recipe can serve models with and without, say, an ``lm_head``.

Per-layer dict options (``layer_bits``, ``blocks``, ``layer_sparsity``, ``layer_ratios``) name exact
layers and go through the same :func:`check_names`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx

from graphpress.errors import PassError
from graphpress.ir import opsets
from graphpress.ir.rewrite import packet

__all__ = ["FAMILY_PREFIX", "REGEX_PREFIX", "Selection", "Selector", "check_names", "check_selector", "family", "unknown_layer"]

REGEX_PREFIX = "re:"
FAMILY_PREFIX = "op:"

#: Reasons a layer is left out, as they appear in a pass's ``skipped`` / ``kept`` stats.
IGNORED = "skipped by config"
NOT_TARGETED = "not in targets"


def family(name: str) -> frozenset | None:
    """The op family of :mod:`graphpress.ir.opsets` called ``name`` (lowercase, ``linear``), or None."""
    upper = name.upper()
    if name != name.lower() or upper not in opsets.__all__:
        return None
    return getattr(opsets, upper)


Nodes = fx.Node | Iterable[fx.Node] | None  #: the node(s) of one unit: a layer's node, a weight's readers


def _as_nodes(nodes: Nodes) -> tuple[fx.Node, ...]:
    if nodes is None:
        return ()
    return (nodes,) if isinstance(nodes, fx.Node) else tuple(nodes)


def _in_family(fam: frozenset, nodes: tuple[fx.Node, ...]) -> bool:
    return any(n.op == "call_function" and (n.target in fam or packet(n) in fam) for n in nodes)


def unknown_layer(pass_name: str, option: str, name: str, known: Iterable[str], eligible: Collection[str] = ()) -> PassError:
    """The one "unknown layer" error: pass, option, the name, and the closest known name or the list.

    Parameters
    ----------
    pass_name : str
        Registered name of the pass (``"prune-weights"``).
    option : str
        The config option that holds the name (``"skip"``, ``"layer_bits"``).
    name : str
        The name that matched no layer.
    known : iterable of str
        Every name the option may use (eligible and rejected layers, groups, ...): the suggestion
        is drawn from these.
    eligible : collection of str
        Names listed when no known name is close (the first six, in the given order).
    """
    close = difflib.get_close_matches(str(name), sorted(set(known)), n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    elif eligible:
        shown = list(eligible)
        hint = "layers are: " + ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")
    else:
        hint = "the graph has no eligible layer"
    return PassError(f"pass '{pass_name}': option '{option}': names unknown layer '{name}': {hint}")


def check_names(pass_name: str, option: str, keys: Iterable[str], known: Iterable[str], eligible: Collection[str] = ()) -> None:
    """Raise :func:`unknown_layer` for the first of ``keys`` that is not in ``known``."""
    known = set(known)
    for key in keys:
        if key not in known:
            raise unknown_layer(pass_name, option, key, known, eligible)


def _entries(config: Any, option: str) -> tuple[str, ...]:
    return tuple(getattr(config, option, ()) or ())


def check_selector(pass_name: str, config: Any) -> None:
    """Config-time check of ``targets`` / ``ignore`` / ``skip`` (call it from ``__post_init__``).

    Each entry must be a string; a ``re:`` entry must compile; an ``op:`` entry must name a family
    of :mod:`graphpress.ir.opsets`. Names are checked against the graph later
    (:meth:`Selector.resolve`), when the pass runs.
    """
    for option in ("targets", "ignore", "skip"):
        value = getattr(config, option, ())
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise PassError(f"pass '{pass_name}': option '{option}' must be a list of layer names or patterns, got {value!r}")
        for entry in value:
            if not isinstance(entry, str) or not entry:
                raise PassError(f"pass '{pass_name}': option '{option}': {entry!r} is not a layer name or pattern")
            if option == "skip":
                continue
            if entry.startswith(REGEX_PREFIX):
                try:
                    re.compile(entry[len(REGEX_PREFIX):])
                except re.error as e:
                    raise PassError(f"pass '{pass_name}': option '{option}': '{entry}' is not a valid regex ({e})") from None
            elif entry.startswith(FAMILY_PREFIX) and family(entry[len(FAMILY_PREFIX):]) is None:
                fams = sorted(n.lower() for n in opsets.__all__)
                close = difflib.get_close_matches(entry[len(FAMILY_PREFIX):], fams, n=1)
                hint = f"did you mean '{FAMILY_PREFIX}{close[0]}'?" if close else f"families: {', '.join(fams)}"
                raise PassError(f"pass '{pass_name}': option '{option}': '{entry}' names no op family of graphpress.ir.opsets: {hint}")


@dataclass(frozen=True)
class _Rule:
    """One resolved entry: an exact name, a full-match regex or an op family."""

    name: str | None = None
    regex: re.Pattern | None = None
    fam: frozenset | None = None

    def matches(self, name: str, nodes: tuple[fx.Node, ...]) -> bool:
        if self.name is not None:
            return name == self.name
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return _in_family(self.fam, nodes)


@dataclass(frozen=True)
class Selection:
    """A selector resolved against one graph's layers: answers "does the pass touch this layer?"."""

    targets: tuple[_Rule, ...]
    ignore: tuple[_Rule, ...]

    def reason(self, names: str | Iterable[str], nodes: Nodes = None) -> str | None:
        """None when the layer is selected, else why not (``"skipped by config"`` / ``"not in targets"``).

        ``names`` is the layer's name, or several names of one unit (a channel group and its
        layers, a weight and the layers reading it); ``nodes`` its node or nodes (op families
        match on them). The unit is ignored when any name or node is, and targeted when any is.
        """
        names = [names] if isinstance(names, str) else list(names)
        nodes = _as_nodes(nodes)
        if any(r.matches(n, nodes) for r in self.ignore for n in names):
            return IGNORED
        if self.targets and not any(r.matches(n, nodes) for r in self.targets for n in names):
            return NOT_TARGETED
        return None

    def selects(self, names: str | Iterable[str], nodes: Nodes = None) -> bool:
        """Whether the pass may touch the layer (see :meth:`reason`)."""
        return self.reason(names, nodes) is None


@dataclass(frozen=True)
class Selector:
    """``targets`` / ``ignore`` / ``skip`` of one pass's config, before it has seen a graph."""

    pass_name: str
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    @classmethod
    def of(cls, pass_name: str, config: Any) -> "Selector":
        """The selector a config holds (options it lacks count as empty)."""
        return cls(pass_name, _entries(config, "targets"), _entries(config, "ignore"), _entries(config, "skip"))

    def resolve(self, layers: Mapping[str, Nodes], rejected: Iterable[str] = (), *, known: Iterable[str] = ()) -> Selection:
        """Check every entry against the graph's layers and return the :class:`Selection`.

        Parameters
        ----------
        layers : mapping of str to fx.Node, list of fx.Node or None
            The eligible layers by name, in graph order, with their node(s): op families match on
            these (None: the unit matches names and regexes only).
        rejected : iterable of str
            Layers of the right kind the pass cannot rewrite: naming them is not an error.
        known : iterable of str
            Further names the options may use (e.g. channel-group names).

        Raises
        ------
        PassError
            An exact name that is no layer, or a ``targets`` entry that selects no layer.
        """
        names = list(layers)
        known_names = set(names) | set(rejected) | set(known)
        every = sorted(known_names)
        eligible = names or every

        def rule(option: str, entry: str) -> _Rule:
            if option != "skip" and entry.startswith(REGEX_PREFIX):
                r = _Rule(regex=re.compile(entry[len(REGEX_PREFIX):]))
            elif option != "skip" and entry.startswith(FAMILY_PREFIX):
                r = _Rule(fam=family(entry[len(FAMILY_PREFIX):]))
            elif entry in known_names:
                return _Rule(name=entry)
            elif option != "skip" and family(entry) is not None:
                r = _Rule(fam=family(entry))
            else:
                raise unknown_layer(self.pass_name, option, entry, known_names, eligible)
            if option == "targets" and not any(r.matches(n, _as_nodes(layers.get(n))) for n in every):
                shown = ", ".join(eligible[:6]) + (", ..." if len(eligible) > 6 else "")
                raise PassError(f"pass '{self.pass_name}': option 'targets': '{entry}' selects no layer: "
                                + (f"layers are: {shown}" if shown else "the graph has no eligible layer"))
            return r

        targets = tuple(rule("targets", e) for e in self.targets)
        ignore = tuple(rule("ignore", e) for e in self.ignore) + tuple(rule("skip", e) for e in self.skip)
        return Selection(targets, ignore)
