"""``refat run CONFIG.yaml`` (or :func:`run_experiment`): one config in, a resumable run folder with a report out."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..configs import ConfigError
from ..models import Model
from ..storage import folder_lock, write_json, write_text
from .config import ExperimentConfig, load_config
from .context import Context, Models
from .inputs import Inputs, resolve_inputs
from .layout import Layout
from .plan import plan
from .provenance import model_id, provenance
from .runner import Runner, Stage, now

__all__ = ["run_experiment"]

log = logging.getLogger("refat.pipeline")


def _console() -> None:
    """Progress lines on stderr unless the application configured logging itself."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not any(getattr(h, "_refat_console", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("refat: %(message)s"))
        h._refat_console = True  # type: ignore[attr-defined]
        log.addHandler(h)


def run_experiment(config: ExperimentConfig | str | Path, out_root: str | Path = "runs", *, model: Model | None = None,
                   force_stages: Sequence[str] = ()) -> Path:
    """Run (or resume) an experiment; returns its folder ``out_root/<name>``.

    ``model``: an already-loaded base model to use instead of loading ``config.model`` (stages are then
    keyed by its name and source, so pass ``force_stages`` if you change its weights under the same name).
    ``force_stages``: stage names or prefixes (``"attacks"``, ``"train/refat"``) to recompute even if unchanged;
    the stages reading them follow, as after any change.
    Every input is checked (datasets, model specs, files, attack configs) before anything is written. The
    folder is locked while the run writes into it: a second run of the same config gets a clear error.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    inputs = resolve_inputs(cfg, base_model=model is None)
    stages = plan(cfg, model_id(cfg, model))
    names = [s.name for s in stages]
    for f in force_stages:
        if not any(n == f or n.startswith(f.rstrip("/") + "/") for n in names):
            raise ConfigError(f"force: no stage {f!r} in this config; stages: {', '.join(names)}")
    layout = Layout(Path(out_root) / cfg.name)
    with folder_lock(layout.root):
        _run(cfg, inputs, stages, layout, model, force_stages)
    return layout.root


def _run(cfg: ExperimentConfig, inputs: Inputs, stages: list[Stage], layout: Layout, model: Model | None,
         force_stages: Sequence[str]) -> None:
    from ..judges import from_spec

    _console()
    file_log = logging.FileHandler(layout.log, encoding="utf-8")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file_log)
    try:
        log.info("run %s: %d stages in %s", cfg.name, len(stages), layout.root)
        runner = Runner(layout.root, force=force_stages, seed=cfg.seed)
        runner.retire_stale({s.name for s in stages})
        import yaml

        write_text(layout.config, yaml.safe_dump(cfg.resolved(), sort_keys=False, allow_unicode=True))
        prov = provenance(cfg, inputs, model)
        write_json(layout.provenance, prov)
        context = Context(cfg, inputs, layout, Models(cfg, layout, model), from_spec(cfg.attack_judge))
        try:
            runner.run(stages, context)
        finally:  # what ran and what was skipped, also after a crash
            write_json(layout.provenance, {**prov, "stages": runner.report, "finished": now()})
        log.info("run %s finished: %s", cfg.name, layout.report / ("report.md" if cfg.report else "asr.json"))
    finally:
        log.removeHandler(file_log)
        file_log.close()
