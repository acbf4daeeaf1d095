"""Graph passes: registry, configs, the verified pipeline and recipes.

Passes import only :mod:`graphpress.ir`. Families live in sub-packages (``cleanup``, ``fusion``)
and register themselves on import; :func:`registered` imports them.
"""

from graphpress.passes.base import (
    Pass,
    PassResult,
    config_from_dict,
    config_to_dict,
    describe,
    get_pass_class,
    make_pass,
    register,
    registered,
)
from graphpress.passes.pipeline import Pipeline, PipelineReport, StepRecord
from graphpress.passes.recipes import Recipe, load_recipe

__all__ = [
    "Pass",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "Recipe",
    "StepRecord",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "get_pass_class",
    "load_recipe",
    "make_pass",
    "register",
    "registered",
]
