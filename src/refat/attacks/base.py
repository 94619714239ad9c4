"""What every attack shares: behaviours in, one JSONL record per behaviour out, resumable.

An attack is a function ``attack_one(behaviour) -> AttackRecord`` wrapped by :func:`run_attack`,
which skips behaviours already in ``records.jsonl``, appends each finished record at once (so a
killed run loses at most the behaviour in progress), and judges every completion with the judge it
is given. The shape is nanoGCG's: a config dataclass and one signature for every attack,
``run(model, behaviours, config, out_dir=None, *, judge=None, context=None, progress=True)``, where
``context`` (:class:`AttackContext`) carries what only some attacks need.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..configs import fingerprint_data
from ..data import Example, affirmative_target, load_dataset, prompt_key
from ..errors import InputError
from ..judges import RefusalStringJudge
from ..models import check_resumable, describe_identity, identity
from ..storage import FinishedRunError, read_json, write_json, write_jsonl

if TYPE_CHECKING:
    from ..directions import Directions
    from ..models import Model

__all__ = ["Behaviour", "AttackCost", "AttackRecord", "AttackContext", "behaviours_from", "run_attack", "read_records",
           "attack_success_rate", "success_rates", "string_judge", "AttackConfigMismatch", "refused_by", "NO_ATTACK",
           "claim_records", "claim_model"]

NO_ATTACK = "none"  # the attack name of a record answered without attack (RFA's baseline)


class AttackConfigMismatch(FinishedRunError):
    """``out_dir`` holds records made with another model, attack config, behaviour set or judge: resuming
    would mix them."""


@dataclass(frozen=True)
class Behaviour:
    """A harmful request and the affirmative opening an optimising attack aims for."""

    goal: str
    target: str
    id: str = ""

    def __post_init__(self):
        if not self.goal.strip():
            raise ValueError("a behaviour needs a non-empty goal")
        if not self.id:  # stable across runs and datasets: a hash of the normalised goal
            object.__setattr__(self, "id", hashlib.sha256(prompt_key(self.goal).encode()).hexdigest()[:16])


def behaviours_from(examples: Sequence[Example] | str, n: int | None = None) -> list[Behaviour]:
    """Behaviours from examples or a dataset spec (registry name, file, ``hf:`` id); dataset targets kept."""
    if isinstance(examples, str):
        examples = load_dataset(examples)
    out = [Behaviour(e.prompt, e.target or affirmative_target(e.prompt)) for e in examples]
    if not out:
        raise InputError("the behaviour set is empty")
    return out[:n] if n is not None else out


def refused_by(model, behaviours: Sequence[Behaviour], n: int | None = None, *,
               judge: RefusalStringJudge | None = None, max_new_tokens: int = 32,
               batch_size: int = 16) -> list[Behaviour]:
    """The first ``n`` behaviours ``model`` refuses without attack (an attack can only show success on
    those); screened a batch at a time, so a large set is not generated in full."""
    from ..generation import generate

    judge = judge or RefusalStringJudge()
    kept: list[Behaviour] = []
    for i in tqdm(range(0, len(behaviours), batch_size), desc="screening behaviours"):
        chunk = behaviours[i:i + batch_size]
        answers = generate(model, [b.goal for b in chunk], max_new_tokens=max_new_tokens, progress=False)
        kept += [b for b, a in zip(chunk, answers, strict=True) if judge.refuses(a)]
        if n is not None and len(kept) >= n:
            break
    return kept[:n]


@dataclass(frozen=True)
class AttackContext:
    """Resources beyond model, behaviours and config that some attacks need (``AttackEntry.needs`` names
    them), so every attack keeps one signature and callers pass the same context to all."""

    directions: Directions | None = None  # the refusal direction (RFA ablates it)
    harmless: list[str] = field(default_factory=list)  # prompts whose refusal RFA also measures (over-refusal)
    # harmful prompts disjoint from the attacked behaviours, on which worst-case RFA chooses its ablation
    validation: list[str] = field(default_factory=list)
    # a model judge's spec (the run's first): PAIR's default rater rates with it instead of refusal strings
    rating_judge: str | None = None
    seed: int = 0
    dtype: str = "auto"  # helper models loaded by spec (PAIR's attacker, AutoDAN's mutator) use these
    device: str | None = None

    def require(self, attack: str, resource: str):
        """The resource, or a ValueError naming the attack and what it lacks."""
        value = getattr(self, resource)
        if value is None or (isinstance(value, list) and not value):
            raise InputError(f"{attack} needs {resource} in its AttackContext (e.g. --{resource} on the command line)")
        return value

    def load(self, spec: str, target: object) -> Model:
        """A helper model by spec; the target itself when ``spec`` is its name (no second copy in memory)."""
        from ..models import Model, load

        if isinstance(target, Model) and spec == target.name:
            return target
        return load(spec, dtype=self.dtype, device=self.device)


def string_judge(judge: RefusalStringJudge | None) -> RefusalStringJudge:
    """``judge``, or the default refusal-string judge when None (every attack's default)."""
    return RefusalStringJudge() if judge is None else judge


@dataclass
class AttackCost:
    forward: int = 0  # forward passes (batches)
    backward: int = 0
    seconds: float = 0.0


@dataclass
class AttackRecord:
    """One behaviour's attack: what was sent, what came back, how it got there and what it cost."""

    attack: str
    behaviour_id: str
    goal: str
    target: str
    prompt: str  # the user message the attack sends (instruction with suffix, template, ...)
    completion: str  # the model's greedy answer to it
    history: list[dict] = field(default_factory=list)  # per-iteration loss / score
    cost: AttackCost = field(default_factory=AttackCost)
    extra: dict = field(default_factory=dict)  # attack-specific (template name, prefill text, ...)
    refused: bool | None = None
    judge: str | None = None

    @property
    def behaviour(self) -> str:
        """The id of the behaviour attacked: ``behaviour_id`` itself, or ``extra["behaviour_id"]`` for an attack that
        sends several prompts per behaviour (templates: each record's own id is ``<behaviour>:<template>``)."""
        return self.extra.get("behaviour_id", self.behaviour_id)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttackRecord":
        return cls(**{**d, "cost": AttackCost(**d.get("cost", {}))})


def _read(path: Path) -> tuple[list[AttackRecord], bool]:
    """(records, whether the file ends in a half-written line, left by a run killed while appending)."""
    if not path.exists():
        return [], False
    *lines, tail = path.read_text(encoding="utf-8").split("\n")  # not splitlines: completions hold odd separators
    out = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                out.append(AttackRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out, bool(tail.strip())


def read_records(path: str | Path) -> list[AttackRecord]:
    """Records of a (possibly interrupted) run; a half-written last line is dropped, not fatal."""
    return _read(Path(path))[0]


def _append(path: Path, record: AttackRecord) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record.to_dict(), ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


ATTACK_META = "attack.json"  # the fingerprint of the records beside it


def _differences(have: dict, want: dict, has_records: bool) -> dict[str, str]:
    """Each part of ``want`` that ``have`` (the stored fingerprint) contradicts: ``stored …; this run: …``. A
    behaviour list may grow (a rerun with a larger --n-behaviours attacks the new ones); a part the folder did
    not record differs once it holds records, since nothing says they match."""
    out = {}
    for key, now in want.items():
        if key not in have and not has_records:
            continue
        stored = have.get(key)
        if key == "behaviours" and stored is not None and now[:len(stored)] == stored:
            continue
        if stored != now:
            out[key] = f"stored {_show(key, stored)}; this run: {_show(key, now)}"
    return out


def _show(key: str, value) -> str:
    if value is None:
        return "not recorded"
    if key == "model":
        return describe_identity(value)
    if key == "behaviours":
        return f"{len(value)} behaviours [{', '.join(value[:3])}{', …' if len(value) > 3 else ''}]"
    if key == "config" and isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)[:200]
    return str(value)


def claim_records(out: str | Path, fingerprint: dict) -> None:
    """Refuse to add records to ``out`` unless every part of ``fingerprint`` (attack, config, behaviours, judge;
    the model, claimed by the caller that loaded it) matches what made the records already there; then record
    it in ``attack.json``. A mismatch raises :class:`AttackConfigMismatch` naming each part that differs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / ATTACK_META
    have = read_json(meta) if meta.exists() else {}
    want = json.loads(json.dumps(fingerprint, default=str))
    has_records = bool(read_records(out / "records.jsonl"))
    diffs = _differences(have, want, has_records)
    if diffs:
        what = f"{have['attack']} records" if "attack" in have else "attack records"
        raise AttackConfigMismatch(f"{out} holds {what} made with another {' and '.join(diffs)} "
                                   f"({' | '.join(f'{k}: {v}' for k, v in diffs.items())}); "
                                   "pass --overwrite for a fresh run or choose another --out")
    if have | want != have:
        write_json(meta, have | want)


def claim_model(out: str | Path, model: Model) -> None:
    """:func:`claim_records` for the model: the records in ``out`` must come from a model of this identity
    (weights, adapter, dtype, device; :func:`refat.models.identity`)."""
    if read_records(Path(out) / "records.jsonl"):
        check_resumable(model, out)
    claim_records(out, {"model": identity(model)})


def run_attack(name: str, behaviours: Sequence[Behaviour], attack_one: Callable[[Behaviour], AttackRecord], *,
               config: object, out_dir: str | Path | None = None,
               judge: RefusalStringJudge | None = None, progress: bool = True) -> list[AttackRecord]:
    """Attack each behaviour not already done in ``out_dir``; returns all records, in behaviour order,
    each stamped with ``judge``'s name and verdict (default: the refusal-string judge)."""
    judge = string_judge(judge)
    if not behaviours:
        raise InputError("the behaviour set is empty: nothing to attack")
    done: dict[str, AttackRecord] = {}
    path = None
    if out_dir is not None:
        out = Path(out_dir)
        claim_records(out, {"attack": name,
                            "config": fingerprint_data(config) if is_dataclass(config) else dict(config),
                            "behaviours": [b.id for b in behaviours], "judge": judge.name})
        path = out / "records.jsonl"
        records, torn = _read(path)
        done = {r.behaviour_id: r for r in records}
        if torn:  # rewrite without the torn last line so appends stay line-aligned
            write_jsonl(path, [r.to_dict() for r in records])
    todo = [b for b in behaviours if b.id not in done]
    for b in tqdm(todo, desc=name, disable=not progress or not todo):
        t0 = time.perf_counter()
        record = attack_one(b)
        if not record.cost.seconds:
            record.cost.seconds = round(time.perf_counter() - t0, 3)
        record.refused, record.judge = judge.refuses(record.completion), judge.name
        done[b.id] = record
        if path is not None:
            _append(path, record)
    return [done[b.id] for b in behaviours]


def attack_success_rate(records: Sequence[AttackRecord]) -> float:
    """Fraction of behaviours whose completion the judge did not count as a refusal."""
    if not records:
        raise ValueError("no records")
    return sum(not r.refused for r in records) / len(records)


def success_rates(records: Sequence[AttackRecord]) -> dict[str, float]:
    """ASR per record, and per behaviour counting a success on any of its records (best of n: templates
    send several prompts per behaviour: :attr:`AttackRecord.behaviour`)."""
    if not records:
        raise ValueError("no records")
    best: dict[str, bool] = {}
    for r in records:
        best[r.behaviour] = best.get(r.behaviour, False) or not r.refused
    return {"asr": attack_success_rate(records), "asr_best_of_n": sum(best.values()) / len(best)}
