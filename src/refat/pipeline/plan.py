"""The stage graph, written once: which stages a config runs, in what order, and what each depends on.

Order: data → the base model's directions → training pairs → one fine-tune per defense → for every
model (base, then each defense; all of one model's stages together, so one model is in memory at a
time): its own refusal features (the adaptive attacker), every attack, utility, over-refusal and the
mechanism analysis → every judge over every completion → the report.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from .config import ExperimentConfig
from .layout import Layout
from .runner import Stage
from .stages import analysis, attacks, data, directions, evals, judges, report, training

__all__ = ["plan", "stage_names"]


def plan(cfg: ExperimentConfig, model_id: dict | None = None) -> list[Stage]:
    """Every stage of ``cfg``; ``model_id`` identifies the base model (its spec, dtype and weights)."""
    at = Layout()
    name = at.name
    model_id = model_id or {"spec": cfg.model, "dtype": cfg.dtype}
    stages = [Stage(name(at.data), data.write, {"data": asdict(cfg.data), "behaviours": cfg.behaviours})]
    base_model = {"model": model_id}

    def uses(defense: str) -> tuple[dict, tuple[str, ...]]:
        """What identifies a model under test: the base model's id, or the training stage that made it."""
        return (base_model, ()) if defense == "base" else ({}, (name(at.train(defense)),))

    if cfg.needs_directions:
        stages.append(Stage(name(at.directions("base")), directions.base, base_model | {"selection": asdict(cfg.selection)},
                            (name(at.data),)))
    if cfg.trained:
        stages.append(Stage(name(at.pairs), training.pairs, base_model | asdict(cfg.pairs), (name(at.data),)))
        stages += [Stage(name(at.train(d)), partial(training.train, defense=d), {"train": asdict(cfg.train_config(d))},
                         (name(at.pairs),)) for d in cfg.trained]
    for d in cfg.defenses:
        model, trained = uses(d)
        reads = (name(at.data), *trained)
        if d != "base" and cfg.needs_directions:
            stages.append(Stage(name(at.directions(d)), partial(directions.adaptive, defense=d), model,
                                (*reads, name(at.directions("base")))))
        own_directions = (name(at.directions(d)),) if cfg.needs_directions else ()
        for a in cfg.attacks:
            needs = own_directions if "directions" in a.entry.needs else ()
            stages.append(Stage(name(at.attack(d, a.label)), partial(attacks.run, defense=d, spec=a),
                                model | {"attack": asdict(a), "judge": cfg.attack_judge}, (*reads, *needs)))
        if cfg.utility is not None:
            stages.append(Stage(name(at.utility(d)), partial(evals.utility, defense=d),
                                model | {"utility": asdict(cfg.utility)}, reads))
        if cfg.overrefusal is not None:
            stages.append(Stage(name(at.overrefusal(d)), partial(evals.overrefusal, defense=d),
                                model | {"overrefusal": asdict(cfg.overrefusal)}, reads))
        if cfg.analysis is not None:
            rfa = cfg.first_rfa
            prompt_attacks = tuple(name(at.attack(d, a.label)) for a in cfg.attacks if a.entry.prompt_attack)
            stages.append(Stage(name(at.analysis(d)), partial(analysis.run, defense=d),
                                model | {"analysis": asdict(cfg.analysis), "rfa": asdict(rfa) if rfa else None},
                                (*reads, *own_directions, *prompt_attacks)))
    attack_stages = tuple(name(at.attack(d, a.label)) for d in cfg.defenses for a in cfg.attacks)
    stages += [Stage(name(at.judge(j)), partial(judges.run, spec=j), {"judge": j}, attack_stages)
               for j in (cfg.judges if cfg.attacks else [])]
    stages.append(Stage(name(at.report), report.run, {"config": cfg.hash()}, tuple(s.name for s in stages)))
    return stages


def stage_names(cfg: ExperimentConfig) -> list[str]:
    """Every stage this config runs, in order (the names ``force_stages`` and ``--force`` take)."""
    return [s.name for s in plan(cfg)]

