"""Judges: was a completion jailbroken? One :class:`Judge` protocol, one factory (:func:`from_spec`).

Every judge gives a score per (behaviour, completion) pair and calls it jailbroken above its threshold;
its ``name`` (with ``@threshold`` when not the default) is stamped on every verdict so results of
different judges are never mixed. The refusal-string judge is the cheap one the attacks stop on;
the classifier judges say whether what was said instead is harmful; :mod:`.agreement` measures any
judge against human labels.
"""

from .agreement import (
                        LabelledResponse,
                        agreement,
                        calibrate_threshold,
                        judge_agreement,
                        load_classifier_comparison,
                        published_agreement,
                        rank_auc,
                        score_agreement,
)
from .base import Judge, judge_records
from .cache import cache_path, cached_scores, slug
from .classifiers import ChatJudge, HarmBenchJudge, LlamaGuardJudge
from .ensemble import EnsembleFit, EnsembleJudge
from .spec import JUDGE_KINDS, JudgeSpec, from_spec, judge_name, judge_threshold, parse_spec
from .strings import PREFIX_LISTS, RefusalStringJudge, rate, refusal_records

__all__ = ["Judge", "judge_records", "JudgeSpec", "JUDGE_KINDS", "parse_spec", "judge_name", "judge_threshold",
           "from_spec", "RefusalStringJudge", "PREFIX_LISTS", "refusal_records", "rate", "HarmBenchJudge",
           "LlamaGuardJudge", "ChatJudge", "cached_scores", "cache_path", "slug", "LabelledResponse",
           "load_classifier_comparison", "agreement", "judge_agreement", "score_agreement", "published_agreement",
           "rank_auc", "calibrate_threshold", "EnsembleFit", "EnsembleJudge"]
