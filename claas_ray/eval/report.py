"""The evaluation's outputs: JSON (everything), a Markdown summary, and PNG plots."""

from __future__ import annotations

from pathlib import Path

from claas_ray.eval.runner import EvalReport, best_compliance, capability_loss


def write_report(report: EvalReport, folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "summary.md", "plot": folder / "compliance.png"}
    paths["json"].write_text(report.model_dump_json(indent=2))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    return paths


def markdown(report: EvalReport) -> str:
    lines = [
        "# claas-ray evaluation",
        "",
        f"Endpoint {report.config.url}, {report.config.steps} feedback steps of {report.config.train_batch} items, "
        f"measured every {report.config.eval_every} steps on held-out prompts.",
        "",
        "| preference | compliance at 0 | final | best | log-prob margin 0 -> final | capability NLL change "
        "| QA accuracy (base) | distinct-2 0 -> final | repetition 0 -> final | rejected steps | target met | collapsed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base_qa = report.base_capability.get("qa_accuracy")
    targets = {check.preference: check for check in report.targets}
    for result in report.results:
        first, last = result.checkpoints[0], result.checkpoints[-1]
        qa = "n/a" if last.capability_qa_accuracy is None else f"{last.capability_qa_accuracy:.2f} ({base_qa:.2f})"
        lines.append(
            f"| {result.preference} | {first.compliance:.2f} | {last.compliance:.2f} | {best_compliance(result):.2f} | "
            f"{first.margin:+.3f} -> {last.margin:+.3f} | {capability_loss(result):+.1%} | {qa} | "
            f"{first.distinct_2:.2f} -> {last.distinct_2:.2f} | {first.repetition:.2f} -> {last.repetition:.2f} | "
            f"{result.rejected_steps} | {_yes(targets, result.preference, 'met')} | {_yes(targets, result.preference, 'collapsed')} |"
        )
    lines += ["", "Target: held-out compliance >= 0.8 by step 8 and still there at the last checkpoint, "
              "general-text NLL no more than 3% above the base model's. Collapsed: distinct-2 of the answers "
              "under half the base model's, or repetition above 0.5 (not part of the target, but it should be)."]
    return "\n".join(lines) + "\n"


def _yes(targets: dict, preference: str, field: str) -> str:
    check = targets.get(preference)
    return "n/a" if check is None else ("yes" if getattr(check, field) else "no")


def plot(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for result in report.results:
        steps = [c.step for c in result.checkpoints]
        left.plot(steps, [c.compliance for c in result.checkpoints], marker="o", label=result.preference)
        if result.checkpoints[-1].capability_nll_ratio is not None:
            right.plot(steps, [c.capability_nll_ratio for c in result.checkpoints], marker="o", label=result.preference)
    left.set(title="Compliance on held-out prompts", xlabel="feedback steps", ylabel="compliance", ylim=(-0.05, 1.05))
    right.set(title="General-text NLL relative to base", xlabel="feedback steps", ylabel="NLL / base NLL")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
