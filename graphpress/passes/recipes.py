"""Named pipelines (recipes) in YAML.

A recipe file::

    name: fold-and-clean
    description: fold batch norms, then drop what they leave behind
    passes:
      - fold-batchnorm
      - fuse-linear-activation: {activations: [relu]}
      - eliminate-dead-code
    verify:
      random_inputs: 2
      seed: 0

``passes`` items are a pass name, or a one-key mapping ``{name: {option: value}}``. Built-in
recipes live in ``graphpress/recipes/*.yaml`` and are found by name (``--recipe default``).
Every error names the file and what to change.

An optional ``backend`` section names the backend the recipe is meant for and its options::

    backend: onnxruntime                       # or, with options:
    backend: {name: tvm, options: {tune_trials: 64}}

Only its shape is checked here (passes never import backends); :func:`graphpress.api.compress`
checks the name and the options against the backend's options class before any work.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from graphpress.errors import PassError
from graphpress.passes.base import config_to_dict, make_pass

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "recipes"
_TOP_KEYS = ("name", "description", "passes", "verify", "backend")
_VERIFY_KEYS = ("random_inputs", "seed")
_BACKEND_KEYS = ("name", "options")


@dataclass
class Recipe:
    """A named list of ``(pass name, config dict)`` plus verification settings."""

    name: str
    passes: list[tuple[str, dict[str, Any]]]
    description: str = ""
    random_inputs: int = 2
    seed: int = 0
    origin: str = "<dict>"
    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    _validated: bool = field(default=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<dict>") -> "Recipe":
        if not isinstance(data, dict):
            raise PassError(f"{origin}: a recipe must be a mapping with a 'passes' list")
        _check_keys(data, _TOP_KEYS, "recipe", origin)
        raw = data.get("passes")
        if not isinstance(raw, list) or not raw:
            raise PassError(f"{origin}: 'passes' must be a non-empty list of pass names")
        passes: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                passes.append((item, {}))
            elif isinstance(item, dict) and len(item) == 1:
                (name, cfg), = item.items()
                if cfg is not None and not isinstance(cfg, dict):
                    raise PassError(f"{origin}: passes[{i}] '{name}': options must be a mapping, got {cfg!r}")
                passes.append((str(name), dict(cfg or {})))
            else:
                raise PassError(f"{origin}: passes[{i}] must be a pass name or {{name: {{options}}}}, got {item!r}")
        verify = data.get("verify") or {}
        if not isinstance(verify, dict):
            raise PassError(f"{origin}: 'verify' must be a mapping")
        for key in verify:
            if key not in _VERIFY_KEYS:
                raise PassError(f"{origin}: unknown verify option '{key}': valid options: {', '.join(_VERIFY_KEYS)}")
        backend, backend_options = _backend_section(data.get("backend"), origin)
        recipe = cls(
            name=str(data.get("name") or Path(origin).stem),
            passes=passes,
            description=str(data.get("description") or ""),
            random_inputs=int(verify.get("random_inputs", 2)),
            seed=int(verify.get("seed", 0)),
            origin=origin,
            backend=backend,
            backend_options=backend_options,
        )
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Instantiate every pass once so unknown names and options fail before any work."""
        for i, (name, cfg) in enumerate(self.passes):
            try:
                make_pass(name, cfg)
            except PassError as err:
                raise PassError(f"{self.origin}: passes[{i}]: {err}") from None
        self._validated = True

    def to_dict(self) -> dict[str, Any]:
        """Round-trips through :meth:`from_dict`; configs are spelled out in full."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "passes": [{name: config_to_dict(make_pass(name, cfg).config)} for name, cfg in self.passes],
            "verify": {"random_inputs": self.random_inputs, "seed": self.seed},
        }
        if self.backend is not None:
            out["backend"] = {"name": self.backend, "options": dict(self.backend_options)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_keys(mapping: dict, valid: Sequence[str], what: str, origin: str) -> None:
    """One line naming the first key of ``mapping`` not in ``valid``, with the closest one."""
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            raise PassError(f"{origin}: unknown {what} key '{key}': {hint}")


def _backend_section(section: Any, origin: str) -> tuple[str | None, dict[str, Any]]:
    """``backend: NAME`` or ``backend: {name: NAME, options: {...}}`` -> (name, options)."""
    if section is None:
        return None, {}
    if isinstance(section, str):
        return section, {}
    if not isinstance(section, dict):
        raise PassError(f"{origin}: 'backend' must be a backend name or {{name: NAME, options: {{...}}}}, got {section!r}")
    _check_keys(section, _BACKEND_KEYS, "backend", origin)
    name = section.get("name")
    if not isinstance(name, str) or not name:
        raise PassError(f"{origin}: 'backend' needs a 'name' (e.g. backend: {{name: onnxruntime}})")
    options = section.get("options") or {}
    if not isinstance(options, dict):
        raise PassError(f"{origin}: backend 'options' must be a mapping of option names to values, got {options!r}")
    return name, dict(options)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_recipe(spec: str | Path) -> Recipe:
    """Load a recipe from a YAML path, or a built-in recipe by name."""
    path = Path(spec)
    if not path.exists():
        builtins = builtin_recipes()
        if str(spec) in builtins:
            path = builtins[str(spec)]
        else:
            close = difflib.get_close_matches(str(spec), builtins, n=1)
            hint = f" (did you mean built-in '{close[0]}'?)" if close else f"; built-in recipes: {', '.join(builtins)}"
            raise PassError(f"{spec}: recipe file not found{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PassError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PassError(f"{path}: cannot read recipe: {err}") from None
    return Recipe.from_dict(data, origin=str(path))
