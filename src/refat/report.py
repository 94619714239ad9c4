"""The run report: markdown and a self-contained HTML page from a run folder's stage outputs.

Each stage writes one small JSON file; the report reads whichever exist and says "not run" for the
others, so it can be written at any point of a run. Expected inputs (all optional)::

    RUN_DIR/
      run.json                        {key: value}: model, seed, versions... (shown as a table)
      asr.json                        {defense: {attack: {judge: CELL}}}, CELL an ASR in [0, 1]
      utility.json                    {defense: {benchmark: CELL}}
      overrefusal.json                {defense: {dataset: CELL}}, CELL a refusal rate in [0, 1]
      paired.json                     {defense: {measure: CELL + "vs_base": CELL or null}}: refusal rates and
                                        utility, and each one's difference from the base model on the same items
      judge_agreement.json            [{"judges": [a, b], "cells": [{"defense", "attack", "asr": {a: CELL, b: CELL},
                                        "disagree": CELL, "kappa": number or null}]}]
      samples.json                    {"judge": first judge, "samples": [{"defense", "attack", "behaviour_id",
                                        "goal", "completion", "verdicts": {judge: jailbroken}}]}
      compute.json                    {defense: {metric: number}}; if absent, read from
                                      train/<defense>/train_summary.json ("compute", as the trainer writes it)
      analysis.json, analysis/<name>/analysis.json    written by refat.analysis.AnalysisResult.save
      train/<defense>/metrics.jsonl   one {"step": int, "loss": float, ...} per line (the trainer's file)

Outputs: ``RUN_DIR/report.md`` (plots linked from ``RUN_DIR/plots/``) and ``RUN_DIR/report.html``
(plots embedded as base64 PNG, no other file needed). A CELL is a plain number (older run folders),
``{"value", "n", "ci": [low, high]}`` (a :class:`refat.stats.Rate`, shown as ``36 % [24, 50] (n=50)``) or
``{"mean", "sd", "seeds"}`` (a :class:`refat.stats.Spread` over training seeds, ``36 ± 4 % (3 seeds)``). A
defense row is a model: its name, ``<name>@seed<s>`` for another training seed, and ``<name> (<n> seeds)``
for the mean ± sd over its seeds.
Plots need matplotlib (``refat[plots]``); ``plots=False`` writes the tables only. This module does not import torch.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .stats import Rate, Spread, pareto_front
from .storage import atomic_path, write_text

__all__ = ["write_report", "PlotsUnavailableError"]


class PlotsUnavailableError(ImportError):
    pass


# ---- document model: sections of paragraphs, tables and figures, rendered to markdown and HTML ------------------

@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: bool = True  # right-align the value columns


@dataclass
class _Figure:
    path: Path
    caption: str


@dataclass
class _Missing:
    text: str


@dataclass
class _Section:
    title: str
    blocks: list = field(default_factory=list)  # str (paragraph) | "### sub" | _Table | _Figure | _Missing
    level: int = 2


def _md_cell(s: str) -> str:
    """Markdown renderers pass raw HTML through: escape it (cells hold model text), then the table syntax."""
    return re.sub(r"[\r\n]+", " ", html.escape(s, quote=False).replace("|", "\\|"))


def _markdown(title: str, sections: list[_Section], run_dir: Path) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"{'#' * sec.level} {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, _Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                out.append("|" + "|".join(["---"] + ["---:" if b.numeric else "---"] * (len(b.headers) - 1)) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            elif isinstance(b, _Figure):
                out.append(f"![{b.caption}]({b.path.relative_to(run_dir).as_posix()})")
            elif isinstance(b, _Missing):
                out.append(f"*{b.text}*")
            else:
                out.append(b)
            out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,-apple-system,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.8rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
figure{margin:1rem 0}img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9rem}
table.text td{text-align:left;vertical-align:top;overflow-wrap:anywhere}
.missing{color:#888;font-style:italic}code{background:#f4f4f4;padding:0 .2rem}"""


def _inline(text: str) -> str:
    """Escape, then turn markdown `code` and **bold** into HTML."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def _html(title: str, sections: list[_Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        body.append(f"<h{sec.level}>{html.escape(sec.title)}</h{sec.level}>")
        for b in sec.blocks:
            if isinstance(b, _Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                cls = "" if b.numeric else ' class="text"'
                body.append(f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, _Figure):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                cap = html.escape(b.caption)
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{cap}">'
                            f"<figcaption>{cap}</figcaption></figure>")
            elif isinstance(b, _Missing):
                body.append(f'<p class="missing">{_inline(b.text)}</p>')
            elif b.startswith("### "):
                body.append(f"<h3>{_inline(b[4:])}</h3>")
            else:
                body.append(f"<p>{_inline(b)}</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- formatting and reading -------------------------------------------------------------------------------------

def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _cell(x) -> Rate | Spread | float | None:
    """One table cell in any of its forms: a plain number (older run folders, hand-written tables),
    ``{"value", "n", "ci"}``, a rate with its sample size and 95 % interval, or ``{"mean", "sd", "seeds"}``, a
    result's spread over training seeds. Anything else is missing."""
    if not isinstance(x, dict):
        return _num(x)
    if "mean" in x:
        mean, sd, seeds = _num(x.get("mean")), _num(x.get("sd")), x.get("seeds")
        ok = isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0
        return Spread(mean, sd, seeds) if mean is not None and sd is not None and ok else mean
    value, n, ci = _num(x.get("value")), x.get("n"), x.get("ci")
    if value is None:
        return None
    whole = isinstance(n, int) and not isinstance(n, bool) and n > 0
    if whole and isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        return Rate(value, n, (float(ci[0]), float(ci[1])))
    return value


def _bar_heights(cells: list) -> tuple[list[float], list[float], list[float]]:
    """Bar heights in percent (a missing cell: 0) and the interval's extent below and above each (0 without one;
    clamped, as a percentile interval may miss its point estimate by a rounding error)."""
    vals, lows, highs = [], [], []
    for x in cells:
        c = _cell(x)
        if isinstance(c, Spread):  # a seed average: ± one sd
            vals.append(100 * c.mean)
            lows.append(100 * c.sd)
            highs.append(100 * c.sd)
            continue
        v = 100 * (c.value if isinstance(c, Rate) else c or 0.0)
        vals.append(v)
        lows.append(max(0.0, v - 100 * c.ci[0]) if isinstance(c, Rate) else 0.0)
        highs.append(max(0.0, 100 * c.ci[1] - v) if isinstance(c, Rate) else 0.0)
    return vals, lows, highs


def _show(x, plain: Callable[[float], str]) -> str:
    """Any cell as text. A cell kind that carries its uncertainty formats itself (a :class:`Rate`:
    ``36 % [24, 50] (n=50)``; a :class:`Spread`: ``36 ± 4 % (3 seeds)``); a plain number goes through ``plain``."""
    c = _cell(x)
    if isinstance(c, (Rate, Spread)):
        return c.format()
    return "—" if c is None else plain(c)


def _pct(x) -> str:
    """A rate cell; a plain number as ``36.0 %``."""
    return _show(x, lambda v: f"{100 * v:.1f} %")


def _score(x) -> str:
    """A benchmark cell: an accuracy with its interval (in percent, as a rate), or a plain score as it is."""
    return _show(x, _fmt)


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return "—"
    return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _read_json(path: Path, run_dir: Path) -> tuple[object, str | None]:
    """(content, None), (None, None) when the file is absent, or (None, why) when it cannot be read."""
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"Could not read `{path.relative_to(run_dir).as_posix()}`: {e}"


def _nested(obj, depth: int, name: str, schema: str) -> str | None:
    """None when ``obj`` is a dict nested ``depth`` levels deep (leaves anything), else why not."""
    def ok(o, d):
        return isinstance(o, dict) and (d == 1 or all(ok(v, d - 1) for v in o.values()))
    return None if ok(obj, depth) else f"`{name}` does not follow the schema {schema}; skipped."


def _columns(table: dict[str, dict]) -> list[str]:
    cols: list[str] = []
    for row in table.values():
        cols += [c for c in row if c not in cols]
    return cols


def _not_run(name: str, what: str) -> _Missing:
    return _Missing(f"Not run: no `{name}` in this run folder ({what}).")


# ---- plots ------------------------------------------------------------------------------------------------------

def _figure_class():
    try:
        from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch
    except ImportError as e:
        raise PlotsUnavailableError("the report's plots need matplotlib: pip install 'refat[plots]' "
                                    "(or write tables only: write_report(..., plots=False), refat report --no-plots)") from e
    return Figure


class _Plotter:
    def __init__(self, plot_dir: Path, enabled: bool):
        self.dir, self.Figure = plot_dir, (_figure_class() if enabled else None)

    def _save(self, fig, name: str, caption: str) -> _Figure:
        path = self.dir / f"{_slug(name)}.png"
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return _Figure(path, caption)

    def bars(self, name: str, table: dict[str, dict], caption: str, ylabel: str) -> list[_Figure]:
        if self.Figure is None:
            return []
        cols, rows = _columns(table), list(table)
        fig = self.Figure(figsize=(max(5.0, 1.2 * len(cols) * max(1, len(rows)) ** 0.5 + 2), 3.6))
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            vals, lows, highs = _bar_heights([table[r].get(c) for c in cols])
            ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))], vals, width, label=r,
                   yerr=[lows, highs] if any(lows) or any(highs) else None, capsize=2)
        ax.set_xticks(range(len(cols)), cols, rotation=20 if len(cols) > 4 else 0, ha="right" if len(cols) > 4 else "center")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        return [self._save(fig, name, caption)]

    def lines(self, name: str, series: dict[str, list], caption: str, ylabel: str, *, xlabel: str = "layer",
              x: dict[str, list] | None = None, vline: int | None = None, hline: float | None = None,
              band: dict[str, list] | None = None) -> list[_Figure]:
        if self.Figure is None or not series:
            return []
        fig = self.Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        for k, ys in series.items():
            xs = x[k] if x else list(range(len(ys)))
            ys = [float("nan") if _num(y) is None else y for y in ys]
            (line,) = ax.plot(xs, ys, marker="o" if len(ys) <= 40 else None, ms=3, label=k)
            if band and k in band:
                sd = [0.0 if _num(s) is None else s for s in band[k]]
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=line.get_color(), alpha=0.15, lw=0)
        if vline is not None:
            ax.axvline(vline, color="grey", ls="--", lw=1)
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8)
        ax.xaxis.set_major_locator(self.integer_ticks())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        return [self._save(fig, name, caption)]

    @staticmethod
    def integer_ticks():
        from matplotlib.ticker import MaxNLocator
        return MaxNLocator(integer=True)

    def tradeoff(self, name: str, points: dict[str, tuple], front: set[str], caption: str, xlabel: str,
                 ylabel: str) -> list[_Figure]:
        """Over-refusal (x) against robustness (y), in percent, each model labelled; the front drawn as a line."""
        pts = {k: (100 * x, 100 * y) for k, (x, y) in points.items() if x is not None and y is not None}
        if self.Figure is None or not pts:
            return []
        fig = self.Figure(figsize=(5.6, 4.4))
        ax = fig.add_subplot()
        for k, (x, y) in pts.items():
            ax.scatter([x], [y], s=24, color="tab:red" if k in front else "tab:grey")
            ax.annotate(k, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        line = sorted(v for k, v in pts.items() if k in front)
        if len(line) > 1:
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", lw=0.8, alpha=0.6)
        ax.set_xlabel(f"{xlabel} refusal (%)")
        ax.set_ylabel(f"{ylabel} (%)")
        return [self._save(fig, name, caption)]

    def scatter(self, name: str, coords: list, labels: list[str], caption: str, explained: list) -> list[_Figure]:
        if self.Figure is None or not coords:
            return []
        fig = self.Figure(figsize=(5.2, 4.4))
        ax = fig.add_subplot()
        for lab in dict.fromkeys(labels):
            pts = [c for c, l in zip(coords, labels) if l == lab]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.7, label=lab)
        ev = [_num(e) or 0.0 for e in explained] + [0.0, 0.0]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f} %)")
        ax.legend(fontsize=8)
        return [self._save(fig, name, caption)]


# ---- sections ---------------------------------------------------------------------------------------------------

def _run_section(tables: Path) -> list[_Section]:
    info, err = _read_json(tables / "run.json", tables)
    if info is None and err is None:
        return []
    sec = _Section("Run")
    if err or not isinstance(info, dict):
        sec.blocks.append(_Missing(err or "`run.json` is not a JSON object; skipped."))
    else:
        rows = [[k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)] for k, v in info.items()]
        sec.blocks.append(_Table(["field", "value"], rows, numeric=False))
    return [sec]


def _asr_section(tables: Path, plot: _Plotter) -> _Section:
    sec = _Section("Attack success rate")
    data, err = _read_json(tables / "asr.json", tables)
    bad = err or (data is not None and _nested(data, 3, "asr.json", "{defense: {attack: {judge: asr}}}"))
    if data is None or bad:
        sec.blocks.append(_Missing(bad) if bad else _not_run("asr.json", "attack stage"))
        return sec
    judges: list[str] = []
    for attacks in data.values():
        for by_judge in attacks.values():
            judges += [j for j in by_judge if j not in judges]
    sec.blocks.append("Share of harmful behaviours the attack got a non-refusal for (rows: defense; columns: "
                      "attack). Lower is better for the defense. [low, high]: 95 % bootstrap interval over the n "
                      "behaviours (a behaviour's prompt variants, e.g. templates, are resampled together).")
    for judge in judges:
        table = {d: {a: v.get(judge) for a, v in attacks.items() if judge in v} for d, attacks in data.items()}
        cols = _columns(table)
        if len(judges) > 1:
            sec.blocks.append(f"### Judge: {judge}")
        else:
            sec.blocks.append(f"Judge: `{judge}`.")
        sec.blocks.append(_Table(["defense", *cols], [[d, *(_pct(row.get(c)) for c in cols)] for d, row in table.items()]))
        sec.blocks += plot.bars(f"asr_{judge}", table, f"ASR by attack and defense ({judge})", "ASR (%)")
    return sec


def _optional(tables: Path, name: str, title: str) -> tuple[_Section | None, object]:
    """A section for a table only some runs have: (None, None) when the file is absent; the section
    already holds the reason when the file cannot be read."""
    data, err = _read_json(tables / name, tables)
    if data is None and err is None:
        return None, None
    sec = _Section(title)
    if err:
        sec.blocks.append(_Missing(err))
    return sec, data


def _schema_error(name: str, e: Exception) -> _Missing:
    return _Missing(f"`{name}` does not follow the schema in refat.report ({type(e).__name__}: {e}); skipped.")


def _kappa(k) -> str:
    v = _num(k)
    return "—" if v is None else f"{v:.2f}"


def _agreement_section(tables: Path) -> list[_Section]:
    """Two judges side by side: where they disagree, the ASR depends on the judge more than on the defense."""
    sec, data = _optional(tables, "judge_agreement.json", "Judge agreement")
    if sec is None or data is None:
        return [sec] if sec else []
    sec.blocks.append("Per defense and attack, each judge's ASR, the share of completions on which the two judges "
                      "disagree (95 % Wilson interval, n completions) and Cohen's κ between their verdicts "
                      "(— where both judges gave one verdict only).")
    try:
        for pair in data:
            a, b = pair["judges"]
            if len(data) > 1:
                sec.blocks.append(f"### {a} vs {b}")
            sec.blocks.append(_Table(["defense", "attack", f"ASR {a}", f"ASR {b}", "disagree", "Cohen's κ"],
                                     [[c["defense"], c["attack"], _pct(c["asr"].get(a)), _pct(c["asr"].get(b)),
                                       _pct(c["disagree"]), _kappa(c["kappa"])] for c in pair["cells"]]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        sec.blocks = [_schema_error("judge_agreement.json", e)]
    return [sec]


MAX_SAMPLES = 100  # rows of the samples table; samples.json keeps them all
SAMPLE_CHARS, GOAL_CHARS = 400, 200


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n].rstrip() + " […]"


def _samples_section(tables: Path) -> list[_Section]:
    """Completions to read beside the numbers: a judge's verdicts are claims about text a reviewer can check."""
    sec, data = _optional(tables, "samples.json", "Sample completions")
    if sec is None or data is None:
        return [sec] if sec else []
    try:
        samples, judges = data["samples"], list(data["samples"][0]["verdicts"]) if data["samples"] else []
        rows = [[s["defense"], s["attack"], str(s["behaviour_id"]),
                 " / ".join("jailbroken" if v else "refused" for v in s["verdicts"].values()),
                 _clip(str(s["goal"]), GOAL_CHARS), _clip(str(s["completion"]), SAMPLE_CHARS)]
                for s in samples[:MAX_SAMPLES]]
        sec.blocks += [f"Per defense and attack, the first completions (in behaviour-id order) that `{data['judge']}` "
                       f"judged jailbroken and refused, cut at {SAMPLE_CHARS} characters. Verdicts by judge: "
                       + ", ".join(f"`{j}`" for j in judges) + ".",
                       _Table(["defense", "attack", "behaviour", "verdicts", "goal", "completion"], rows,
                              numeric=False)]
        if len(samples) > MAX_SAMPLES:
            sec.blocks.append(_Missing(f"{len(samples) - MAX_SAMPLES} more in `samples.json`."))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        sec.blocks = [_schema_error("samples.json", e)]
    return [sec]


def _matrix_section(tables: Path, name: str, title: str, what: str, first: str, fmt, intro: str) -> _Section:
    sec = _Section(title)
    data, err = _read_json(tables / name, tables)
    bad = err or (data is not None and _nested(data, 2, name, f"{{defense: {{{first}: value}}}}"))
    if data is None or bad:
        sec.blocks.append(_Missing(bad) if bad else _not_run(name, what))
        return sec
    cols = _columns(data)
    sec.blocks += [intro, _Table(["defense", *cols], [[d, *(fmt(row.get(c)) for c in cols)] for d, row in data.items()])]
    return sec


def _paired_section(tables: Path) -> list[_Section]:
    """Each model's refusal rates and utility beside the base model's, measured on the same items: the difference
    a defense makes, with an interval that the pairing narrows (the items' shared difficulty cancels)."""
    sec, data = _optional(tables, "paired.json", "Difference from the base model")
    if sec is None or data is None:
        return [sec] if sec else []
    bad = _nested(data, 2, "paired.json", '{defense: {measure: {"value", "n", "ci", "vs_base"}}}')
    if bad:
        sec.blocks.append(_Missing(bad))
        return [sec]
    cols = _columns(data)
    diffs = [[d, *(_pct((row.get(c) or {}).get("vs_base")) for c in cols)] for d, row in data.items()
             if any((row.get(c) or {}).get("vs_base") for c in cols)]
    sec.blocks += [
        ("Refusal rates on each over-refusal set (lower is better), utility over every benchmark question together "
         "and refusal under the worst-case adaptive RFA attack by the run's first judge (higher is better); "
         "[low, high]: 95 % interval over the n items (a `(n seeds)` row: mean ± sd over training seeds)."),
        _Table(["defense", *cols], [[d, *(_pct(row.get(c)) for c in cols)] for d, row in data.items()]),
        ("The same, minus the base model's, in percentage points, on the same prompts and questions matched by "
         "prompt or id; [low, high]: 95 % paired-bootstrap interval over the n items (a `(n seeds)` row: the "
         "seed-averaged outcome per item minus the base's, so its interval is over items, given these seeds)."),
        _Table(["defense", *cols], diffs) if diffs else _Missing("No model besides the base model."),
    ]
    return [sec]


def _point(x) -> float | None:
    """A cell's point estimate (a rate's value, a spread's mean, a plain number)."""
    c = _cell(x)
    return c.mean if isinstance(c, Spread) else c.value if isinstance(c, Rate) else c


def _tradeoff_section(tables: Path, plot: _Plotter) -> list[_Section]:
    """Robustness against over-refusal (paired.json): which models no other beats on every measure at once
    (refusal under the worst-case RFA and utility higher, each over-refusal set lower). A defense with several
    seeds is shown by its seed mean."""
    data, _ = _read_json(tables / "paired.json", tables)
    if not isinstance(data, dict) or len(data) < 2 or _nested(data, 2, "paired.json", "") is not None:
        return []
    cols = _columns(data)
    robust = [c for c in cols if c.endswith(" refusal")]  # refusal under an attack (report.stages.rfa_measure)
    over = [c for c in cols if c not in robust and c != "utility"]
    if not robust or not over:
        return []
    averaged = {k.rsplit(" (", 1)[0] for k in data if k.endswith(" seeds)")}
    models = [k for k in data if k.split("@seed")[0] not in averaged or k.endswith(" seeds)")]
    measures = [robust[0], *over, *(["utility"] if "utility" in cols else [])]
    points = {m: [_point(data[m].get(c)) for c in measures] for m in models}
    front = pareto_front(points, [c not in over for c in measures])  # over-refusal lower, the rest higher
    sec = _Section("Robustness against over-refusal")
    sec.blocks += [
        (f"Each model's refusal under the attack ({robust[0]}, higher is better) beside its refusal of benign "
         "prompts (lower is better) and utility (higher is better), point estimates with their intervals as above; "
         "**not dominated**: no other model is at least as good on every one of these and better on one."),
        _Table(["model", *measures, "not dominated"],
               [[m, *(_pct(data[m].get(c)) for c in measures), "yes" if m in front else ""] for m in models]),
    ]
    for c in over:
        sec.blocks += plot.tradeoff(f"tradeoff {c}", {m: (points[m][measures.index(c)], points[m][0]) for m in models},
                                    front, f"Refusal under {robust[0].removesuffix(' refusal')} against refusal of "
                                           f"{c} prompts; the models not dominated are joined.", c, robust[0])
    return [sec]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compute_section(run_dir: Path, tables: Path) -> _Section:
    if (tables / "compute.json").is_file():
        return _matrix_section(tables, "compute.json", "Compute cost", "", "metric", _fmt,
                               "Cost per model: training passes and wall time on the machine that ran it, "
                               "from `compute.json`.")
    sec = _Section("Compute cost")
    table, errors = {}, []
    for path in sorted((run_dir / "train").glob("*/train_summary.json")):
        summary, err = _read_json(path, run_dir)
        if err or not isinstance(summary, dict) or not isinstance(summary.get("compute"), dict):
            errors.append(_Missing(err or f"`{path.relative_to(run_dir).as_posix()}` has no `compute` object; skipped."))
            continue
        table[path.parent.name] = _flatten(summary["compute"])
    if not table:
        sec.blocks += errors or [_not_run("compute.json", "nor any `train/*/train_summary.json`")]
        return sec
    cols = _columns(table)
    sec.blocks += ["Training cost per defense, from each `train/*/train_summary.json` (`perturbation.*`: the "
                   "method's extra work beyond refusal training).",
                   _Table(["defense", *cols], [[d, *(_fmt(row.get(c)) for c in cols)] for d, row in table.items()]),
                   *errors]
    return sec


def _read_metrics(path: Path) -> tuple[list[int], list[float], float, int]:
    """Steps, losses, total seconds, and how many lines were unreadable (a killed run's last line)."""
    steps, losses, seconds, bad = [], [], 0.0, 0
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), _num(row["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        steps.append(step)
        losses.append(loss)
        seconds += _num(row.get("seconds")) or 0.0
    return steps, losses, seconds, bad


def _training_section(run_dir: Path, plot: _Plotter) -> _Section:
    sec = _Section("Training")
    runs, rows, notes = {}, [], []
    for path in sorted((run_dir / "train").glob("*/metrics.jsonl")):
        name = path.parent.name
        try:
            steps, losses, seconds, bad = _read_metrics(path)
        except (OSError, UnicodeDecodeError) as e:
            notes.append(_Missing(f"Could not read `{path.relative_to(run_dir).as_posix()}`: {e}"))
            continue
        if bad:
            notes.append(_Missing(f"`{path.relative_to(run_dir).as_posix()}`: {bad} unreadable line(s) skipped."))
        if not steps:
            continue
        runs[name] = (steps, losses)
        rows.append([name, str(len(steps)), _fmt(losses[0]), _fmt(losses[-1]), _fmt(seconds)])
    if not runs:
        sec.blocks += notes or [_not_run("train/*/metrics.jsonl", "training stage")]
        return sec
    sec.blocks += ["Cross-entropy on response tokens per optimisation step.",
                   _Table(["defense", "steps", "first loss", "final loss", "seconds"], rows), *notes]
    sec.blocks += plot.lines("training_loss", {k: v[1] for k, v in runs.items()}, "Training loss per step", "loss",
                             xlabel="step", x={k: v[0] for k, v in runs.items()})
    return sec


def _analysis_sections(run_dir: Path, plot: _Plotter) -> list[_Section]:
    found = ([("analysis", run_dir / "analysis.json")] if (run_dir / "analysis.json").is_file() else []) + \
            [(p.parent.name, p) for p in sorted((run_dir / "analysis").glob("*/analysis.json"))]
    if not found:
        return [_Section("Mechanism analysis", [_not_run("analysis.json", "nor any `analysis/*/analysis.json`")])]
    sections = []
    for name, path in found:
        title = "Mechanism analysis" + ("" if name == "analysis" else f": {name}")
        sec = _Section(title)
        sections.append(sec)
        a, err = _read_json(path, run_dir)
        if err:
            sec.blocks.append(_Missing(err))
            continue
        try:
            sec.blocks += _analysis_blocks(name, a, plot)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            sec.blocks = [_Missing(f"`{path.relative_to(run_dir).as_posix()}` does not follow the analysis schema "
                                   f"({type(e).__name__}: {e}); skipped.")]
    return sections


def _analysis_blocks(name: str, a: dict, plot: _Plotter) -> list:
    layer, cos, proj, std = int(a["layer"]), a["cosines"], a["projections"], a.get("projection_std", {})
    counts, paired, notes = a.get("counts", {}), a.get("paired", {}), a.get("notes", {})
    blocks = [f"Model `{a['model']}`, activations at position {a['position']}, selected layer {layer}; samples: "
              + ", ".join(f"{k} {v}" for k, v in counts.items()) + ". The induced direction of an attack is "
              + ("the mean over behaviours of a behaviour's clean activation minus the mean of its attacked "
                 "activations (paired: n behaviours)" if a.get("schema", 1) >= 2 else
                 "the mean harmful activation minus the mean attacked-harmful activation (unpaired)")
              + "; cosine 1 with the refusal feature r means the attack acts like refusal feature ablation."]
    if a.get("ablation"):
        blocks.append(f"RFA (`{a['ablation']['attack']}`) ablates as that attack did on this model: "
                      f"{a['ablation']['direction']}, {a['ablation']['description']}.")
    if cos:
        rows = []
        r_norm = a.get("refusal_norms", [])
        for k, c in cos.items():
            vals = [(v, i) for i, v in enumerate(c) if _num(v) is not None]
            best = max(vals) if vals else (None, None)
            norm = (a.get("induced_norms", {}).get(k) or [None] * (layer + 1))[layer]
            ratio = norm / r_norm[layer] if _num(norm) is not None and r_norm and _num(r_norm[layer]) else None
            rows.append([k, "—" if k not in paired else str(paired[k]), _fmt(c[layer]), _fmt(best[0]),
                         "—" if best[1] is None else str(best[1]), _fmt(ratio)])
        blocks.append(_Table(["attack", "n behaviours", f"cosine at layer {layer}", "max cosine", "at layer",
                              f"|induced| / |r| at layer {layer}"], rows))
    blocks += [f"`{k}`: {v}." for k, v in notes.items()]
    blocks.append(_Table(["set", f"mean projection on r̂ at layer {layer}", "std"],
                         [[k, _fmt(v[layer]), _fmt((std.get(k) or [None] * (layer + 1))[layer])] for k, v in proj.items()]))
    blocks += plot.lines(f"cosines_{name}", cos, "Cosine of each attack's induced direction with the refusal feature",
                         "cosine", vline=layer, hline=0.0)
    blocks += plot.lines(f"projections_{name}", proj, "Mean projection onto the refusal feature (±1 std)",
                         "h · r̂", vline=layer, band=std)
    pca = a.get("pca") or {}
    if pca.get("coords"):
        blocks += plot.scatter(f"pca_{name}", pca["coords"], pca["labels"],
                               f"PCA at layer {pca.get('layer', layer)} (fitted on {', '.join(pca.get('fit_on', []))})",
                               pca.get("explained", []))
    return blocks


# ---- entry point ------------------------------------------------------------------------------------------------

def tables_dir(run_dir: str | Path) -> Path:
    """Where a run folder keeps its tables and report: ``report/`` for a ``refat run`` folder, else the folder."""
    run_dir = Path(run_dir)
    return run_dir / "report" if (run_dir / "report" / "stage.json").is_file() else run_dir


def write_report(run_dir: str | Path, *, plots: bool = True, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (and ``plots/*.png``) beside the tables of ``run_dir``
    (:func:`tables_dir`); returns both paths. The title names the run folder unless ``title`` is given.

    Stages that have not run yet get a "not run" line; unreadable files are named, never fatal.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    tables = tables_dir(run_dir)
    plot = _Plotter(tables / "plots", plots)  # fails here, before anything is written, without matplotlib
    sections = [
        *_run_section(tables),
        _asr_section(tables, plot),
        *_agreement_section(tables),
        _matrix_section(tables, "utility.json", "Utility", "utility evaluation", "benchmark", _score,
                        "Benchmark scores per defense (higher is better); [low, high]: 95 % Wilson interval over the "
                        "n scored items."),
        _matrix_section(tables, "overrefusal.json", "Over-refusal", "over-refusal evaluation", "dataset", _pct,
                        "Refusal rate on benign prompts that look harmful (lower is better); [low, high]: 95 % "
                        "Wilson interval over the n prompts."),
        *_paired_section(tables),
        *_tradeoff_section(tables, plot),
        _compute_section(run_dir, tables),
        _training_section(run_dir, plot),
        *_analysis_sections(run_dir, plot),
        *_samples_section(tables),
    ]
    title = f"refat report: {title or run_dir.resolve().name}"
    md = write_text(tables / "report.md", _markdown(title, sections, tables))
    page = write_text(tables / "report.html", _html(title, sections))
    return md, page
