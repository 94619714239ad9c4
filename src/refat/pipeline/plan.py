"""The stage graph, written once: which stages a config runs, in what order, and what each depends on.

Order: data → the base model's directions → training pairs (one stage per distinct set of pair options)
→ one fine-tune per trained defense and seed → for every model under test (the base model, each trained
defense at each seed; all of one model's stages together, so one model is in memory at a time): its own
refusal features (the adaptive attacker), every attack, utility, over-refusal and the mechanism analysis
→ every judge over every completion → the report.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from ..configs import fingerprint_data
from ..evals.overrefusal import DEFAULT_JUDGE, OverRefusalConfig
from ..evals.utility import UtilityConfig
from .config import ExperimentConfig, Subject
from .layout import Layout
from .runner import Stage
from .stages import analysis, attacks, data, directions, evals, judges, report, training

__all__ = ["plan", "stage_names"]


def plan(cfg: ExperimentConfig, model_id: dict | None = None) -> list[Stage]:
    """Every stage of ``cfg``; ``model_id`` identifies the base model (its spec, dtype and weights)."""
    at = Layout()
    name = at.name
    model_id = model_id or {"spec": cfg.model, "dtype": cfg.dtype}
    data_reads = {"data": asdict(cfg.data), "behaviours": cfg.behaviours}
    if cfg.behaviours is not None:  # the filter applies to a separate behaviours set only
        data_reads["near_duplicates"] = cfg.near_duplicates
    if cfg.validation is not None:  # only when set: earlier runs keep their fingerprints
        data_reads["validation"] = cfg.validation
    stages = [Stage(name(at.data), data.write, data_reads)]
    base_model = {"model": model_id}

    def uses(s: Subject) -> tuple[dict, tuple[str, ...]]:
        """What identifies a model under test: the base model's id, or the training stage that made it."""
        return (base_model, ()) if s.seed is None else ({}, (name(at.train(s.key)),))

    if cfg.needs_directions:
        stages.append(Stage(name(at.directions("base")), directions.base, base_model | {"selection": asdict(cfg.selection)},
                            (name(at.data),)))
    pair_sets = {cfg.pairs_key(s.defense): cfg.pairs_config(s.defense) for s in cfg.trained}  # shared where equal
    stages += [Stage(name(at.pairs(key)), partial(training.pairs, pairs=pairs, key=key), base_model | asdict(pairs),
                     (name(at.data),)) for key, pairs in pair_sets.items()]
    stages += [Stage(name(at.train(s.key)), partial(training.train, subject=s),
                     {"train": fingerprint_data(cfg.train_config(s.defense, s.seed))},  # later options: when set
                     (name(at.pairs(cfg.pairs_key(s.defense))),))
               for s in cfg.trained]
    for s in cfg.subjects:
        model, trained = uses(s)
        reads = (name(at.data), *trained)
        if s.seed is not None and cfg.needs_directions:
            stages.append(Stage(name(at.directions(s.key)), partial(directions.adaptive, subject=s), model,
                                (*reads, name(at.directions("base")))))
        own_directions = (name(at.directions(s.directions)),) if cfg.needs_directions else ()
        for a in cfg.attacks_on(s):
            needs = own_directions if "directions" in a.entry.needs else ()
            rates = {"rating_judge": cfg.rating_judge} if hasattr(a.parsed(), "rater") else {}  # PAIR rates with it
            stages.append(Stage(name(at.attack(s.key, a.label)), partial(attacks.run, subject=s, spec=a),
                                model | {"attack": _attack_reads(a), "judge": cfg.attack_judge} | rates, (*reads, *needs)))
        if cfg.utility is not None:
            stages.append(Stage(name(at.utility(s.key)), partial(evals.utility, subject=s),
                                model | {"utility": _utility_reads(cfg.utility)}, reads))
        for o in cfg.overrefusals:
            stages.append(Stage(name(at.overrefusal(s.key, o.label)), partial(evals.overrefusal, subject=s, spec=o),
                                model | {"overrefusal": _overrefusal_reads(o.config)}, reads))
        if cfg.analysis is not None:
            rfa = cfg.first_rfa
            prompt_attacks = tuple(name(at.attack(s.key, a.label)) for a in cfg.attacks_on(s) if a.entry.prompt_attack)
            # worst-case RFA: the analysis ablates the member that attack's sweep chose on this model
            sweep = (name(at.attack(s.key, rfa.label)),) if (
                cfg.analysis.rfa and rfa and rfa.runs_on(s) and rfa.parsed().direction == "worst-case") else ()
            stages.append(Stage(name(at.analysis(s.key)), partial(analysis.run, subject=s),
                                model | {"analysis": asdict(cfg.analysis), "rfa": _attack_reads(rfa) if rfa else None},
                                (*reads, *own_directions, *prompt_attacks, *sweep)))
    attack_stages = tuple(name(at.attack(s.key, a.label)) for s in cfg.subjects for a in cfg.attacks_on(s))
    stages += [Stage(name(at.judge(j)), partial(judges.run, spec=j), {"judge": j}, attack_stages)
               for j in (cfg.judges if cfg.attacks else [])]
    stages.append(Stage(name(at.report), report.run, {"config": cfg.hash()}, tuple(s.name for s in stages)))
    return stages


def _attack_reads(spec) -> dict:
    """The attack as its stage reads it: its config without the options added later at their defaults
    (:func:`refat.configs.added`), and without ``seeds``, which only decides which models it runs on."""
    out = asdict(spec) | {"config": fingerprint_data(spec.parsed())}
    del out["seeds"]
    return out


def _overrefusal_reads(config: OverRefusalConfig) -> dict:
    """The over-refusal config as its stage reads it; the judge is left out at its default, so the fingerprints
    of runs made before the judge was configurable stay valid (they used that judge)."""
    out = asdict(config)
    if out["judge"] == DEFAULT_JUDGE:
        del out["judge"]
    return out


def _utility_reads(config: UtilityConfig) -> dict:
    """The utility config as its stage reads it; the evaluator fields are left out at their defaults (refat's own
    evaluator), so the fingerprints of runs made before lm-eval could be chosen stay valid."""
    out = asdict(config)
    if out["evaluator"] == "refat" and out["lm_eval_tasks"] is None:
        del out["evaluator"], out["lm_eval_tasks"]
    return out


def stage_names(cfg: ExperimentConfig) -> list[str]:
    """Every stage this config runs, in order (the names ``force_stages`` and ``--force`` take)."""
    return [s.name for s in plan(cfg)]

