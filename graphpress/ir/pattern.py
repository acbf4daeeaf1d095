"""A small declarative matcher for FX graphs: patterns are data, a failed match says why.

A pattern describes the producer tree a rewrite needs, rooted at the node the rewrite anchors on::

    conv_bn = op(BATCH_NORM, op(CONV, name="conv", single_use=True, weight=const("w")), name="bn")

``op(family, *args, **kw)`` matches a ``call_function`` node whose target is in ``family`` (an op
family from :mod:`graphpress.ir.opsets`, a packet or an overload); ``args`` constrain positional
arguments and ``kw`` named ones (resolved through the op's schema, so ``weight=`` matches whether
the exporter passed it by position or by keyword). An argument constraint is a sub-pattern or a
literal compared with ``==`` (a bool matches only a bool); ``any()`` accepts any value, ``const()`` a constant tensor, ``attr()`` any ``get_attr`` node,
``through(family, p)`` skips a chain of ops from ``family`` (reading their first argument) before
matching ``p``; ``alt(p, q, ...)`` is the first alternative that matches. ``commute=True`` also tries the two positional sub-patterns swapped.

Constraints are checked in a fixed order, cheapest and most local first: the op's family, its
``check``, ``single_use``, keyword arguments, positional arguments. The first one that fails ends
the match with a :class:`NoMatch` naming the node and the constraint; its ``reason`` (the
constraint alone, or the ``why`` given for it) is what a pass counts in its ``skipped`` stats. A
``quiet`` op's family mismatch means "not a candidate" and is not counted.

:func:`apply_rules` runs :class:`Rule` objects (pattern, optional check on the whole match,
rewrite) over a graph, looking rules up by the root node's op; :func:`first_match` is that look-up
for one node, for a pass that dispatches on rules without rewriting (the pruning dependency analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx

from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import Skips, constant_tensor, is_alive, mutated_targets, packet

__all__ = ["Match", "NoMatch", "Pattern", "Rule", "alt", "any", "apply_rules", "argument", "attr", "const", "first_match", "index_rules", "match", "op", "through"]

#: An argument the op's schema does not have (``training`` of ``_native_batch_norm_legit_no_training``).
ABSENT = type("Absent", (), {"__repr__": lambda self: "<absent>", "__bool__": lambda self: False})()


def argument(node: fx.Node, name: str, default: Any = ABSENT) -> Any:
    """Argument ``name`` of ``node``: by keyword, else at its schema position, else the schema default."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    for i, a in enumerate(schema.arguments if schema is not None else ()):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return a.default_value if a.has_default_value() else default
    return default


def _label(value: Any) -> str:
    return value.name if isinstance(value, fx.Node) else repr(value)


@dataclass(frozen=True)
class NoMatch:
    """Why a pattern did not match: the node (or value) where it failed and the failed constraint.

    Falsy, so ``if not (m := match(...))`` reads naturally. ``str()`` names the node for logs;
    ``reason`` alone is what skip counts aggregate.
    """

    node: Any
    reason: str
    quiet: bool = False

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{_label(self.node)}: {self.reason}"


class Match(dict):
    """Captures of a successful match: ``name -> node`` (or value), plus ``tensors[name]`` for
    ``const`` captures and ``nodes``, the op nodes matched, root first."""

    def __init__(self, graph: Graph | None, mutated: set[str] | None):
        super().__init__()
        self.graph, self.mutated = graph, mutated
        self.tensors: dict[str, torch.Tensor | None] = {}
        self.nodes: list[fx.Node] = []

    def __bool__(self) -> bool:  # a match without captures is still a match
        return True

    def _save(self) -> tuple:
        return dict(self), dict(self.tensors), list(self.nodes)

    def _restore(self, saved: tuple) -> None:
        self.clear()
        self.update(saved[0])
        self.tensors, self.nodes = saved[1], saved[2]


class Pattern:
    """Base class: ``_match(value, m)`` returns None on success (recording captures in ``m``) or a NoMatch."""

    name: str | None = None

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        raise NotImplementedError

    def _capture(self, value: Any, m: Match) -> None:
        if self.name is not None:
            m[self.name] = value


def _match_arg(p: Any, value: Any, where: str, owner: fx.Node, m: Match) -> NoMatch | None:
    if isinstance(p, Pattern):
        return p._match(value, m)
    # 1 == 1.0 is a match, but False == 0 is not: a bool flag and a count are different arguments
    if value is ABSENT or value != p or isinstance(value, bool) != isinstance(p, bool):
        return NoMatch(owner, f"{where} is {value!r}, not {p!r}")
    return None


def _family(family: Any) -> frozenset:
    return frozenset(family) if isinstance(family, (set, frozenset, list, tuple)) else frozenset({family})


class _Op(Pattern):
    def __init__(self, family, args, kwargs, *, name, commute, single_use, check, why, quiet):
        self.family = _family(family)
        if not self.family:
            raise ValueError("op(): empty op family")
        if commute and len(args) != 2:
            raise ValueError("op(commute=True) needs exactly two positional sub-patterns")
        self.args, self.kwargs, self.name = tuple(args), dict(kwargs), name
        self.commute, self.single_use, self.check, self.why, self.quiet = commute, single_use, check, why, quiet

    def _family_text(self) -> str:
        names = sorted(getattr(f, "__name__", str(f)) for f in self.family)
        return "/".join(names[:4]) + (f"/... ({len(names)} ops)" if len(names) > 4 else "")

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        if not (isinstance(value, fx.Node) and value.op == "call_function"
                and (value.target in self.family or packet(value) in self.family)):
            return NoMatch(value, self.why or f"is not {self._family_text()}", self.quiet)
        if self.check is not None and (reason := self.check(value, m)):
            return NoMatch(value, reason)
        if self.single_use and len(value.users) != 1:
            return NoMatch(value, self.single_use if isinstance(self.single_use, str) else "output has other users")
        m.nodes.append(value)
        self._capture(value, m)
        for key, p in self.kwargs.items():
            if (fail := _match_arg(p, argument(value, key), f"argument {key!r}", value, m)) is not None:
                return fail
        return self._match_args(value, self.args, m, first_try=True)

    def _match_args(self, node: fx.Node, pats: tuple, m: Match, first_try: bool) -> NoMatch | None:
        saved = m._save() if self.commute and first_try else None
        # patterns are matched in the order written even when swapped, so a name the first one
        # captures is bound when the second one refers to it
        positions = range(len(pats)) if first_try else (1, 0)
        for i, p in zip(positions, pats):
            value = node.args[i] if i < len(node.args) else ABSENT
            if (fail := _match_arg(p, value, f"argument {i}", node, m)) is not None:
                if saved is None:
                    return fail
                m._restore(saved)
                # report the failure of the order as written, not of the swapped one
                return None if self._match_args(node, pats, m, first_try=False) is None else fail
        return None


def op(family: Any, *args: Any, name: str | None = None, commute: bool = False, single_use: bool | str = False,
       check: Callable[[fx.Node, Match], str | None] | None = None, why: str | None = None, quiet: bool = False,
       **kw: Any) -> Pattern:
    """A node calling an op of ``family`` whose arguments match ``args`` / ``kw``.

    Parameters
    ----------
    family
        An op family from :mod:`graphpress.ir.opsets`, or one packet / overload.
    *args, **kw
        Constraints on positional / named arguments: sub-patterns or literals. ``name``,
        ``commute``, ``single_use``, ``check``, ``why`` and ``quiet`` are this function's own and
        cannot name an op argument.
    name
        Capture the node as ``match[name]``.
    commute
        Also try the two positional sub-patterns in the other order (``add``, ``mul``).
    single_use
        The node's output must have exactly one user; a string is the reason reported otherwise.
    check
        ``check(node, match)`` returns a reason string when the node is refused, else None; it may
        add captures to ``match``. Runs right after the family test.
    why
        Reason reported when the node is not in ``family`` (default: ``"is not <ops>"``).
    quiet
        A family mismatch here means "not a candidate": :func:`apply_rules` does not count it.
    """
    return _Op(family, args, kw, name=name, commute=commute, single_use=single_use, check=check, why=why, quiet=quiet)


class _Const(Pattern):
    def __init__(self, name, optional, single_use, why):
        self.name, self.optional, self.single_use, self.why = name, optional, single_use, why

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        if value is None and self.optional:
            tensor = None
        else:
            tensor = constant_tensor(m.graph, value, m.mutated) if m.graph is not None else None
            if tensor is None:
                return NoMatch(value, self.why or "is not a constant tensor")
            if self.single_use and len(m.graph.tensor_users(str(value.target))) > 1:
                return NoMatch(value, self.single_use if isinstance(self.single_use, str) else "tensor is shared with another op")
        self._capture(value, m)
        if self.name is not None:
            m.tensors[self.name] = tensor
        return None


def const(name: str | None = None, *, optional: bool = False, single_use: bool | str = False, why: str | None = None) -> Pattern:
    """A ``get_attr`` tensor the graph never writes; captured as ``match[name]`` (the node) and
    ``match.tensors[name]`` (the tensor).

    ``optional`` also accepts ``None`` (an absent bias). ``single_use`` requires that no other op
    reads the same tensor (a string is the reason reported otherwise): a rewrite that replaces a
    shared weight would change the other reader too.
    """
    return _Const(name, optional, single_use, why)


class _Attr(Pattern):
    def __init__(self, name, why):
        self.name, self.why = name, why

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return NoMatch(value, self.why or "is not a module attribute")
        self._capture(value, m)
        return None


def attr(name: str | None = None, *, why: str | None = None) -> Pattern:
    """A ``get_attr`` node (a parameter or buffer of the module), whatever it holds and whether or
    not the graph writes it; captured as ``match[name]``. An analysis that only needs to know an
    operand is a module's tensor uses this; a rewrite that reads the tensor needs :func:`const`."""
    return _Attr(name, why)


class _Any(Pattern):
    def __init__(self, name):
        self.name = name

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        if value is ABSENT:
            return NoMatch(value, "argument is missing")
        if self.name in m and m[self.name] is not value:
            return NoMatch(value, f"is not {self.name} ({_label(m[self.name])})")
        self._capture(value, m)
        return None


def any(name: str | None = None) -> Pattern:  # noqa: A001 - the matcher's vocabulary, like tinygrad's UPat.var
    """Any value (node, literal or None) the op actually has; captured as ``match[name]``.

    A name captured earlier in the match (``any("x")`` twice) must be the same value the second time,
    so a pattern can say that two paths start from one node."""
    return _Any(name)


class _Through(Pattern):
    def __init__(self, family, inner, name):
        self.family, self.inner, self.name = _family(family), inner, name

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        passed = []
        while isinstance(value, fx.Node) and value.op == "call_function" and value.args and (
                value.target in self.family or packet(value) in self.family):
            passed.append(value)
            value = value.args[0]
        self._capture(passed, m)
        if (fail := self.inner._match(value, m)) is None:
            m.nodes.extend(passed)
        return fail


def through(family: Any, pattern: Pattern, *, name: str | None = None) -> Pattern:
    """``pattern``, reached through zero or more ops of ``family`` (following their first argument).

    ``match[name]`` is the list of ops passed through, outermost first.
    """
    return _Through(family, pattern, name)


class _Alt(Pattern):
    def __init__(self, alternatives, name):
        if not alternatives:
            raise ValueError("alt(): no alternatives")
        self.alternatives, self.name = tuple(alternatives), name

    def _match(self, value: Any, m: Match) -> NoMatch | None:
        saved, fails = m._save(), []
        for p in self.alternatives:
            if (fail := p._match(value, m)) is None:
                self._capture(value, m)
                return None
            m._restore(saved)  # a failed alternative leaves no captures behind
            fails.append(fail)
        # the alternative that got furthest is the one that says something: the first loud failure
        return next((f for f in fails if not f.quiet), fails[0])


def alt(*alternatives: Pattern, name: str | None = None) -> Pattern:
    """The first of ``alternatives`` that matches (in order, no backtracking into a match once it
    succeeded); ``match[name]`` is the value matched. When none matches, the failure reported is the
    first one that is not ``quiet``, else the first."""
    return _Alt(alternatives, name)


def match(pattern: Pattern, node: Any, graph: Graph | None = None, mutated: set[str] | None = None) -> Match | NoMatch:
    """Match ``pattern`` rooted at ``node``. ``graph`` is needed for ``const()``; ``mutated`` are
    the tensor targets the graph writes (computed when not given)."""
    if graph is not None and mutated is None:
        mutated = mutated_targets(graph)
    m = Match(graph, mutated)
    fail = pattern._match(node, m)
    return m if fail is None else fail


@dataclass(frozen=True)
class Rule:
    """A rewrite as data: ``pattern`` rooted at an ``op()``, an optional ``check(graph, match)``
    returning a reason to refuse a full match, and ``rewrite(graph, match)``, which edits the graph.

    A table that only dispatches (:func:`first_match`; the pruning dependency analysis) holds its
    own kind of handler in ``rewrite`` and calls it with its own arguments."""

    name: str
    pattern: Pattern
    rewrite: Callable[..., None]
    check: Callable[[Graph, Match], str | None] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, _Op):
            raise ValueError(f"rule {self.name!r}: the pattern's root must be an op(...) so the rule can be indexed")


def index_rules(rules: Iterable[Rule]) -> Mapping[Any, tuple[Rule, ...]]:
    """``packet or overload -> rules`` whose root op is in that family, in the given order."""
    index: dict[Any, list[Rule]] = {}
    for rule in rules:
        for target in rule.pattern.family:
            index.setdefault(target, []).append(rule)
    return {k: tuple(v) for k, v in index.items()}


def first_match(rules: Iterable[Rule] | Mapping[Any, tuple[Rule, ...]], node: fx.Node, graph: Graph | None = None,
                mutated: set[str] | None = None) -> tuple[Rule, Match] | list[NoMatch]:
    """The first rule indexed under ``node``'s overload or packet whose pattern matches and whose
    check passes, with its match: ``(rule, match)``.

    When none does, the refusals instead, one :class:`NoMatch` per rule tried (quiet ones
    included; a check's reason is reported at ``node``), in rule order. The list is empty when no
    rule is indexed under the node's op, so a caller can tell "no rule for this op" from "the rules
    for this op refused this node". ``rules`` is an :func:`index_rules` table (or rules to index).
    Nothing is rewritten: :func:`apply_rules` calls ``rule.rewrite(graph, match)``; an analysis
    that dispatches on rules calls its handler with its own arguments.
    """
    index = rules if isinstance(rules, Mapping) else index_rules(rules)
    own = index.get(node.target, ())
    fails: list[NoMatch] = []
    for rule in own + tuple(r for r in index.get(packet(node), ()) if r not in own):
        result = match(rule.pattern, node, graph, mutated)
        if isinstance(result, Match):
            if not (reason := rule.check(graph, result) if rule.check is not None else None):
                return rule, result
            result = NoMatch(node, reason)
        fails.append(result)
    return fails


def apply_rules(graph: Graph, rules: Iterable[Rule] | Mapping[Any, tuple[Rule, ...]], skips: Skips | None = None) -> dict[str, int]:
    """Apply ``rules`` to every node of ``graph``, in graph order; returns ``rule name -> times fired``.

    For each node the first rule that matches and passes its check fires (:func:`first_match`).
    When none does, the reason of each refusal that is not ``quiet`` is added to ``skips``. Nodes
    erased by an earlier rewrite are passed over; the caller recompiles the graph.
    """
    index = rules if isinstance(rules, Mapping) else index_rules(rules)
    mutated = mutated_targets(graph)
    fired: dict[str, int] = {}
    for node in list(graph.gm.graph.nodes):
        if node.op != "call_function" or not is_alive(node):
            continue
        found = first_match(index, node, graph, mutated)
        if isinstance(found, tuple):
            rule, m = found
            rule.rewrite(graph, m)
            fired[rule.name] = fired.get(rule.name, 0) + 1
        elif skips is not None:
            for fail in found:
                if not fail.quiet and fail.reason:
                    skips.add(fail.reason)
    return fired
