"""`miniresnet report RUN_DIR`: one self-contained page per run (report.html beside the run's
files; it opens from disk in any browser, no server), built only from what the run wrote:
config.json, metrics.jsonl, summary.json, test_eval.json and the plots."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .errors import MiniResNetError
from .files import write_text_atomically
from .plots import NO_MATPLOTLIB, have_matplotlib, plot_confusion, plot_curves


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict | None, dict | None]:
    """(config, metrics records, summary or None if unfinished, final test evaluation or None)."""
    for required in ("config.json", "metrics.jsonl"):
        if not (run_dir / required).is_file():
            raise MiniResNetError(f"{run_dir} is not a training run directory: {required} is missing")
    config = read_json_object(run_dir / "config.json")
    history = [read_json_object(run_dir / "metrics.jsonl", line) for line in read_lines(run_dir / "metrics.jsonl")]
    summary, test_eval = (
        read_json_object(run_dir / name) if (run_dir / name).exists() else None
        for name in ("summary.json", "test_eval.json")
    )
    return config, history, summary, test_eval


def read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as e:
        raise MiniResNetError(f"{path} cannot be read ({e})") from None


def read_json_object(path: Path, text: str | None = None) -> dict:
    """A run file's JSON object (`text`: one line of it); anything else is a MiniResNetError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniResNetError(f"{path} is not a run's JSON ({e})") from None
    if not isinstance(value, dict):
        raise MiniResNetError(f"{path} is not a run's JSON: an object was expected, not {type(value).__name__}")
    return value


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    config, history, summary, test_eval = read_run(run_dir)
    notes = []
    if have_matplotlib():
        if history:
            plot_curves(history, run_dir / "curves.png")
        if test_eval:
            plot_confusion(test_eval["confusion"], tuple(test_eval["per_class"]), run_dir / "confusion.png")
    else:
        notes.append(NO_MATPLOTLIB + "; this report has tables only.")
    if summary is None:
        notes.append(f"The run has not finished: {len(history)} of {config.get('epochs')} epochs are recorded.")

    parts = [f"<h1>miniresnet run <code>{_e(run_dir.resolve().name)}</code></h1>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    if summary:
        shown = {k: v for k, v in summary.items() if k not in ("run_dir", "checkpoint", "best_checkpoint")}
        parts += ["<h2>Final figures</h2>", _table(["", ""], [[k, _fmt(v)] for k, v in shown.items()])]
    for name, title in (
        ("curves.png", "Learning curves"),
        ("confusion.png", "Confusion matrix (test set)"),
        ("misclassified.png", "Most confident mistakes (test set)"),
        ("reliability.png", "How far the probabilities can be trusted (test set, at the model's temperature)"),
    ):
        if (run_dir / name).exists():
            parts += [f"<h2>{title}</h2>", f'<img src="{name}" alt="{title}">']
    if test_eval:
        rows = [[c, "(no images)" if a is None else f"{100 * a:.2f}%"] for c, a in test_eval["per_class"].items()]
        parts += [f"<h2>Per-class test accuracy ({_e(test_eval['tta'])} TTA)</h2>", _table(["class", "accuracy"], rows)]
    if history:
        # the last epoch's columns first (it has every evaluation), then any only earlier epochs had
        keys = list(dict.fromkeys(k for m in (history[-1], *history) for k in m if k != "epoch"))
        rows = [[m["epoch"], *(_fmt(m[k]) if k in m else "" for k in keys)] for m in history]
        parts += ["<h2>Every epoch (metrics.jsonl)</h2>", _table(["epoch", *keys], rows)]
    resolved = config.pop("resolved", {})
    rows = [[k, _fmt(v)] for k, v in {**config, **resolved}.items()]
    parts += ["<h2>Configuration (config.json)</h2>", _table(["field", "value"], rows)]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>miniresnet report: {_e(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} .note {{ background: #fff6d5; padding: 0.5em; }}
</style></head><body>
{chr(10).join(parts)}
</body></html>
"""
    out = run_dir / "report.html"
    write_text_atomically(out, page)
    return out


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
