"""Judge specs: the strings configs and the command line name judges by, parsed before any model loads.

``refusal-strings:<list>``, ``refusal-prefix:<list>``, ``llm:<model>[#<prompt>]``, ``harmbench:<model>``,
``llama-guard:<model>`` or ``ensemble:<fitted file>``; a model judge takes ``@<threshold>`` on its score
(default 0.5), and the chat judge a named prompt variant (``classifiers.CHAT_PROMPTS``). A spec's judge
name and threshold are known from the string alone, so a bad spec fails at config time and cached
scores are found without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..configs import ConfigError
from ..models import load as load_model
from .base import DEFAULT_THRESHOLD, Judge
from .classifiers import ChatJudge, HarmBenchJudge, LlamaGuardJudge, threshold_suffix
from .ensemble import EnsembleFit, EnsembleJudge
from .strings import RefusalPrefixJudge, RefusalStringJudge

__all__ = ["JUDGE_KINDS", "JudgeSpec", "parse_spec", "judge_name", "judge_threshold", "from_spec"]

_CLASSES: dict[str, type] = {"refusal-strings": RefusalStringJudge, "refusal-prefix": RefusalPrefixJudge,
                             "llm": ChatJudge, "harmbench": HarmBenchJudge, "llama-guard": LlamaGuardJudge,
                             "ensemble": EnsembleJudge}
_STRING_KINDS = tuple(k for k, cls in _CLASSES.items() if issubclass(cls, RefusalStringJudge))  # a list, no model
JUDGE_KINDS = {kind: cls.kind for kind, cls in _CLASSES.items()}  # spec prefix -> the judge's name prefix


@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # a key of JUDGE_KINDS
    arg: str  # the refusal string list, or the model
    threshold: float | None = None  # None: the default
    prompt: str | None = None  # the chat judge's prompt variant (a key of CHAT_PROMPTS); None: the default

    @property
    def models(self) -> list[str]:
        """The model specs this judge loads (none for the string judges; an ensemble's members' models)."""
        if self.kind in _STRING_KINDS:
            return []
        if self.kind == "ensemble":
            return [m for member in EnsembleFit.load(self.arg).members for m in parse_spec(member).models]
        return [self.arg]

    @property
    def needs_model(self) -> bool:
        return bool(self.models)

    @property
    def name(self) -> str:
        """The name the judge stamps on its verdicts (an ensemble's names its fitted weights' digest)."""
        if self.kind == "ensemble":
            return f"ensemble:{Path(self.arg).stem}#{EnsembleFit.load(self.arg).version}"
        variant = f"#{self.prompt}" if self.prompt else ""
        return f"{JUDGE_KINDS[self.kind]}:{self.arg}{variant}" + threshold_suffix(self.threshold)

    @property
    def version(self) -> str:
        """The ``version`` of the judge this spec builds (its prompt or strings, matching rule, threshold),
        known without loading its model."""
        if self.prompt:
            return ChatJudge.version_of(self.arg, self.threshold, prompt_name=self.prompt)
        return _CLASSES[self.kind].version_of(self.arg, self.threshold)


def parse_spec(spec: str, where: str = "judge") -> JudgeSpec:
    """Check a spec without loading anything; a ConfigError names ``where`` (e.g. ``judges[1]``)."""
    kind, _, arg = spec.partition(":")
    if kind not in JUDGE_KINDS:
        lists = ", ".join(f"{k}:<{'|'.join(_CLASSES[k].lists)}>" for k in _STRING_KINDS)
        raise ConfigError(f"{where}: unknown judge {spec!r}; use {lists}, "
                          "llm:<model>[#prompt][@threshold], harmbench:<model>[@threshold], llama-guard:<model>[@threshold] "
                          "or ensemble:<fitted file>")
    if kind in _STRING_KINDS:
        arg, lists = arg or "default", _CLASSES[kind].lists
        if arg not in lists:
            raise ConfigError(f"{where}: unknown refusal string list {arg!r} for {kind}; choose from {', '.join(lists)}")
        return JudgeSpec(kind, arg)
    if kind == "ensemble":
        try:
            for i, member in enumerate(EnsembleFit.load(arg).members):
                parse_spec(member, f"{where}: {arg} member {i}")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        return JudgeSpec(kind, arg)
    threshold = None
    model, at, value = arg.rpartition("@")
    if at:
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"{where}: {spec!r}: the threshold after '@' must be a number between 0 and 1 "
                              "(a probability of 'jailbroken'), e.g. llm:qwen2.5-coder-1.5b@0.13")
        arg = model
    prompt = None
    if kind == "llm" and "#" in arg:  # a prompt variant (only the chat judge has them)
        arg, _, prompt = arg.rpartition("#")
        try:
            prompt = ChatJudge.check_prompt(prompt)  # the default's name is dropped: it names and caches as before
        except ValueError as e:
            raise ConfigError(f"{where}: {spec!r}: {e}") from None
    if not arg:
        raise ConfigError(f"{where}: {kind}: needs a model after the colon, e.g. {kind}:cais/HarmBench-Llama-2-13b-cls")
    return JudgeSpec(kind, arg, threshold, prompt)


def judge_name(spec: str) -> str:
    """The name the judge of ``spec`` stamps on its verdicts (known without loading its model)."""
    return parse_spec(spec).name


def judge_threshold(spec: str) -> float:
    """The score above which the judge of ``spec`` counts a completion as jailbroken (scores do not depend on it)."""
    return parse_spec(spec).threshold or DEFAULT_THRESHOLD


def from_spec(spec: str, *, dtype: str | None = None, device: str | None = None,
              device_map: str | None = None) -> Judge:
    """The judge of ``spec``, its model loaded (``dtype``, ``device`` or ``device_map``) for the model judges."""
    s = parse_spec(spec)
    if s.kind in _STRING_KINDS:
        return _CLASSES[s.kind](s.arg)
    if s.kind == "ensemble":
        fitted = EnsembleFit.load(s.arg)
        members = [from_spec(m, dtype=dtype, device=device, device_map=device_map) for m in fitted.members]
        return EnsembleJudge(fitted, members, label=Path(s.arg).stem)
    kw = {} if s.threshold is None else {"threshold": s.threshold}
    if s.prompt:
        kw["prompt_name"] = s.prompt
    return _CLASSES[s.kind](load_model(s.arg, dtype=dtype, device=device, device_map=device_map,
                                           max_prompt_tokens=4096), **kw)
