"""fleetpipe.planner: pure planning functions (cost model, exact and heuristic partitioners, baselines).

Nothing here talks MQTT; the control loop feeds measurements in as a :class:`Problem` and gets
a :class:`PlanResult` back.
"""

from __future__ import annotations

from fleetpipe.planner.baselines import even_split, memory_split, neurosurgeon
from fleetpipe.planner.cost import PlanReport, Stage, StageReport, evaluate
from fleetpipe.planner.heuristic import greedy_plan, refine, replan_without
from fleetpipe.planner.partition import PlanResult, device_classes, lower_bound, solve
from fleetpipe.planner.problem import Pin, Problem, load_problem

__all__ = [
    "Pin",
    "PlanReport",
    "PlanResult",
    "Problem",
    "Stage",
    "StageReport",
    "device_classes",
    "evaluate",
    "even_split",
    "greedy_plan",
    "load_problem",
    "lower_bound",
    "memory_split",
    "neurosurgeon",
    "refine",
    "replan_without",
    "solve",
]
