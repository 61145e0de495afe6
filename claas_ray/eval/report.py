"""The evaluation's outputs: JSON (everything), a Markdown summary, and PNG plots."""

from __future__ import annotations

from pathlib import Path

from claas_ray.eval.runner import Checkpoint, EvalReport, PreferenceResult, capability_loss, check_target


def write_report(report: EvalReport, folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "summary.md"}
    paths["json"].write_text(report.model_dump_json(indent=2))
    paths["markdown"].write_text(markdown(report))
    if report.results:  # a run of sequences alone has no per-preference curves to draw
        paths["plot"] = folder / "compliance.png"
        plot(report, paths["plot"])
    if report.sequences:
        paths["sequences_plot"] = folder / "accumulation.png"
        plot_sequences(report, paths["sequences_plot"])
    return paths


def _curve(result: PreferenceResult, key: str) -> str:
    return " / ".join(f"{getattr(c, key):.2f}" for c in result.checkpoints)


def markdown(report: EvalReport) -> str:
    config = report.config
    lines = [
        "# claas-ray evaluation",
        "",
        f"Endpoint {config.url}, {config.steps} feedback events per preference ({config.train_batch} item per step), "
        f"measured every {config.eval_every} events on held-out prompts. Clean compliance: the verifier accepts the "
        "greedy answer and it is not degenerate.",
        "",
        (
            "| preference | clean compliance per checkpoint | raw compliance per checkpoint | degenerate 0 -> final "
            "| NLL change | QA accuracy 0 -> final | distinct-2 0 -> final | mean words 0 -> final | rejected steps "
            "| capability kept | target met |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    targets = {check.preference: check for check in report.targets}
    for result in report.results:
        first, last = result.checkpoints[0], result.checkpoints[-1]
        check = targets.get(result.preference)
        kept = "n/a" if check is None else ("yes" if check.capability_kept else "no: " + "; ".join(check.capability_problems))
        lines.append(
            f"| {result.preference} | {_curve(result, 'clean_compliance')} | {_curve(result, 'compliance')} | "
            f"{first.degenerate:.2f} -> {last.degenerate:.2f} | {capability_loss(result):+.1%} | {_qa(first)} -> {_qa(last)} | "
            f"{first.distinct_2:.2f} -> {last.distinct_2:.2f} | {first.mean_words:.0f} -> {last.mean_words:.0f} | "
            f"{result.rejected_steps} | {kept} | {'n/a' if check is None else ('yes' if check.met else 'no')} |"
        )
    if report.results:
        lines += ["", f"Checkpoints at events {', '.join(str(c.step) for c in report.results[0].checkpoints)}."]
    lines += ["", (
        "Target: clean compliance >= 0.8 within 8 events and still >= 0.8 at the last checkpoint, base clean "
        "compliance under 0.3, capability kept (general-text NLL at most 3% above the base's, QA at most one item "
        "below, distinct-2 at least 0.8x, mean length 0.3x-2x unless the preference is about length)."
    )]
    if report.sequences:
        lines += ["", "## Preferences accumulate", "",
                  "One adapter is taught A for the events above, then B for as many more; A is measured again at the end.",
                  "", "| A then B | A after A | A after B (kept >= 0.7?) | B after B | B target met | met |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for sequence in report.sequences:
            second = check_target(sequence.second)
            lines.append(
                f"| {sequence.first.preference} then {sequence.second.preference} | "
                f"{sequence.first.checkpoints[-1].clean_compliance:.2f} | {sequence.first_kept.clean_compliance:.2f} | "
                f"{sequence.second.checkpoints[-1].clean_compliance:.2f} | {'yes' if second.met else 'no'} | "
                f"{'yes' if sequence.met else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def _qa(checkpoint: Checkpoint) -> str:
    return "n/a" if checkpoint.capability_qa_accuracy is None else f"{checkpoint.capability_qa_accuracy:.2f}"


def plot(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in report.results:
        steps = [c.step for c in result.checkpoints]
        line, = left.plot(steps, [c.clean_compliance for c in result.checkpoints], marker="o", label=result.preference)
        left.plot(steps, [c.compliance for c in result.checkpoints], linestyle=":", color=line.get_color())
        if result.checkpoints[-1].capability_nll_ratio is not None:
            right.plot(steps, [c.capability_nll_ratio for c in result.checkpoints], marker="o", label=result.preference)
    left.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")
    left.set(title="Held-out clean compliance (dotted: raw)", xlabel="feedback events", ylabel="share of answers",
             ylim=(-0.05, 1.05))
    right.set(title="General-text NLL relative to base", xlabel="feedback events", ylabel="NLL / base NLL")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sequences(report: EvalReport, path: Path) -> None:
    """Per ordered pair: A's clean compliance through both phases, and B's through the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(report.sequences), figsize=(5 * len(report.sequences), 4), squeeze=False)
    for axis, sequence in zip(axes[0], report.sequences):
        offset = sequence.first.checkpoints[-1].step
        first = [(c.step, c.clean_compliance) for c in sequence.first.checkpoints]
        first.append((sequence.first_kept.step, sequence.first_kept.clean_compliance))
        second = [(offset + c.step, c.clean_compliance) for c in sequence.second.checkpoints]
        axis.plot(*zip(*first), marker="o", label=f"A: {sequence.first.preference}")
        axis.plot(*zip(*second), marker="s", label=f"B: {sequence.second.preference}")
        axis.axvline(offset, color="grey", linewidth=0.8)
        axis.axhline(0.7, color="grey", linewidth=0.8, linestyle=":")
        axis.set(title=f"{sequence.first.preference} then {sequence.second.preference}", xlabel="feedback events",
                 ylabel="held-out clean compliance", ylim=(-0.05, 1.05))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
