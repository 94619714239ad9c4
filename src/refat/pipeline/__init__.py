"""The experiment pipeline: one YAML config in, a resumable run folder with a report out.

``config`` (what a run does) → ``inputs`` (checked and loaded before any stage) → ``plan`` (the stage
graph, written once) → ``runner`` (fingerprints, resume, stale, force) over ``stages/*`` (one module
per stage kind, each a function of the context and its folder) → a folder laid out by ``layout``.
"""

from .config import DEFENSES, NO_ATTACK, AnalysisConfig, AttackSpec, ExperimentConfig, apply_overrides, load_config
from .inputs import resolve_inputs
from .layout import Layout
from .plan import plan, stage_names
from .run import run_experiment

__all__ = ["DEFENSES", "NO_ATTACK", "AnalysisConfig", "AttackSpec", "ExperimentConfig", "Layout", "apply_overrides",
           "load_config", "plan", "resolve_inputs", "run_experiment", "stage_names"]
