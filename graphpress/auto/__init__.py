"""``compress auto``: a search across compression families under one quality budget.

:mod:`~graphpress.auto.space` (choices per layer, candidates as recipes),
:mod:`~graphpress.auto.trials` (what a trial measures; serial or on Ray),
:mod:`~graphpress.auto.costs` (per-backend cost tables measured here, cached),
:mod:`~graphpress.auto.search` (frontier, measured search, revert, timing),
:mod:`~graphpress.auto.pareto` (the report's plots and page).
"""

from graphpress.auto.search import AutoConfig, AutoResult, search
from graphpress.auto.space import Candidate, Choice
from graphpress.auto.trials import Job, RayTrials, SerialTrials

__all__ = ["AutoConfig", "AutoResult", "Candidate", "Choice", "Job", "RayTrials", "SerialTrials", "search"]
