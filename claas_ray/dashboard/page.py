"""Render the dashboard as plain HTML (no build step); every user-supplied string is escaped."""

from __future__ import annotations

import html
import time
from pathlib import Path

from claas_ray.adapters.store import AdapterNotFoundError, AdapterStore
from claas_ray.feedback.journal import FeedbackEntry

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}h1{margin-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
th{background:#f3f3f3}.applied{color:#176f2c}.rejected{color:#a11}.queued,.training{color:#8a5a00}
.muted{color:#777}img{max-width:100%;border:1px solid #ddd}pre{background:#f7f7f7;padding:.5rem;overflow:auto}
"""

SCRIPT = """
const box = document.getElementById('refresh');
box.checked = localStorage.getItem('claas-refresh') === '1';
box.addEventListener('change', () => localStorage.setItem('claas-refresh', box.checked ? '1' : '0'));
setInterval(() => { if (box.checked) location.reload(); }, 5000);
document.getElementById('rendered').textContent = new Date().toLocaleTimeString();
"""

METRICS = ("loss", "divergence", "kl_to_base", "kl_to_base_after", "grad_norm", "tokens")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def adapters_section(store: AdapterStore, limit_versions: int = 8) -> str:
    rows = []
    for adapter_id in store.list_adapters():
        try:
            latest = store.latest_version(adapter_id)
            versions = store.list_versions(adapter_id)[-limit_versions:]
        except AdapterNotFoundError:
            continue
        for meta in reversed(versions):
            cells = "".join(f"<td>{_number(meta.metrics.get(name))}</td>" for name in METRICS)
            marker = " (latest)" if meta.version == latest else ""
            rows.append(
                f"<tr data-adapter='{_e(adapter_id)}'><td>{_e(adapter_id)}</td><td>{meta.version}{marker}</td>"
                f"<td>{_e(meta.parent_version if meta.parent_version is not None else '')}</td>"
                f"<td>{len(meta.feedback_ids)}</td>{cells}<td>{time.strftime('%H:%M:%S', time.localtime(meta.created_at))}</td></tr>"
            )
    header = "".join(f"<th>{name}</th>" for name in METRICS)
    body = "".join(rows) or "<tr><td colspan='11' class='muted'>no adapters yet</td></tr>"
    return (
        "<h2>Adapters</h2><table id='adapters'><tr><th>adapter</th><th>version</th><th>parent</th><th>feedback</th>"
        f"{header}<th>created</th></tr>{body}</table>"
    )


def feedback_section(entries: list[FeedbackEntry]) -> str:
    rows = []
    for entry in entries:
        outcome = f"v{entry.version}" if entry.version is not None else _e(entry.reason or "")
        rows.append(
            f"<tr data-feedback='{_e(entry.id)}'><td>{time.strftime('%H:%M:%S', time.localtime(entry.created_at))}</td>"
            f"<td>{_e(entry.adapter_id)}</td><td class='{_e(entry.status)}'>{_e(entry.status)}</td><td>{outcome}</td>"
            f"<td>{_e(entry.example.feedback[:200])}</td><td>{_e(entry.example.response_text[:120])}</td></tr>"
        )
    body = "".join(rows) or "<tr><td colspan='6' class='muted'>no feedback yet</td></tr>"
    return (
        "<h2>Recent feedback</h2><table id='feedback'><tr><th>time</th><th>adapter</th><th>status</th><th>result</th>"
        f"<th>feedback</th><th>response</th></tr>{body}</table>"
    )


def latest_eval_run(folder: Path) -> Path | None:
    runs = [path.parent for path in folder.glob("*/report.json")] if folder.is_dir() else []
    return max(runs, key=lambda run: (run / "report.json").stat().st_mtime) if runs else None


def eval_section(folder: Path) -> str:
    run = latest_eval_run(folder)
    if run is None:
        return f"<h2>Evaluation</h2><p class='muted'>no evaluation report in {_e(folder)} yet (run <code>claas-ray eval</code>)</p>"
    summary = (run / "summary.md").read_text() if (run / "summary.md").exists() else ""
    return (
        f"<h2>Evaluation</h2><p>latest run: {_e(run.name)}</p>"
        f"<img id='eval-plot' alt='compliance and capability' src='/dashboard/eval/{_e(run.name)}/compliance.png'>"
        f"<pre id='eval-summary'>{_e(summary)}</pre>"
    )


def render(store: AdapterStore, feedback: list[FeedbackEntry], eval_folder: Path, model: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>claas-ray dashboard</title>"
        f"<style>{STYLE}</style></head><body><h1>claas-ray</h1>"
        f"<p class='muted'>base model {_e(model)} &middot; rendered <span id='rendered'></span> &middot; "
        "<label><input type='checkbox' id='refresh'> refresh every 5 s</label></p>"
        f"{adapters_section(store)}{feedback_section(feedback)}{eval_section(eval_folder)}"
        f"<script>{SCRIPT}</script></body></html>"
    )
