"""`lit-opd report RUN... --output DIR`: a markdown table and a plot of pass@k per benchmark.

A run is a directory written by training or `validate`/`test` with the PassAtKEvaluation
callback. Its scores come from the per-problem `<stage>_step<step>.jsonl` files (the audit trail:
each benchmark's pass@k is the mean of its problems' pass@k), or, for a run without them, from
the `eval/` scalars of its TensorBoard event files.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

JSONL_PATTERNS = ("fit_step*.jsonl", "validate_step*.jsonl", "test_step*.jsonl")
# {step: {"<set>/<metric>": value}}, e.g. {200: {"aime24/pass@8": 0.4, "mean/pass@8": 0.5}}
Scores = dict[int, dict[str, float]]


def read_run(run_dir: str | Path) -> Scores:
    """Scores of one run directory (searched recursively), from its JSONL files if it has any,
    else from its TensorBoard event files. A ValueError if it has neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    files = [path for pattern in JSONL_PATTERNS for path in run_dir.rglob(pattern)]
    scores = _scores_from_jsonl(files) if files else _scores_from_tensorboard(sorted(run_dir.rglob("events.out.tfevents.*")))
    if not scores:
        raise ValueError(f"{run_dir}: no evaluation JSONL files and no eval/ scalars in TensorBoard event files")
    return scores


def _scores_from_jsonl(files: list[Path]) -> Scores:
    """Per (step, set): the mean over problems of pass@k and of num_correct / n (avg@n); the
    unweighted mean over sets as "mean/…", like the callback logs it. Where several files
    evaluated the same step (fit, then validate), the newest one counts."""
    newest = {}
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        newest[int(path.stem.rsplit("_step", 1)[1])] = path
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in newest.values():
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                try:
                    row = json.loads(line)
                    per_set = sums[int(row["step"])]
                    for key, value in row.items():
                        if key.startswith("pass@"):
                            per_set[f"{row['benchmark']}/{key}"].append(float(value))
                    per_set[f"{row['benchmark']}/avg@{row['n']}"].append(row["num_correct"] / row["n"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"{path}:{line_number}: not an evaluation row ({error!r})") from None
    scores = {step: {key: sum(values) / len(values) for key, values in per_set.items()} for step, per_set in sums.items()}
    for values in scores.values():
        values.update(_means(values))
    return scores


def _scores_from_tensorboard(files: list[Path]) -> Scores:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scores: Scores = defaultdict(dict)
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("eval/") and "/" in tag[5:]:
                for event in events.Scalars(tag):
                    scores[event.step][tag[5:]] = event.value
    return dict(scores)


def _means(values: dict[str, float]) -> dict[str, float]:
    """{"mean/<metric>": unweighted mean over the sets} for each pass@k / avg@n metric."""
    by_metric = defaultdict(list)
    for key, value in values.items():
        benchmark, metric = key.split("/", 1)
        if benchmark != "mean":
            by_metric[metric].append(value)
    return {f"mean/{metric}": sum(v) / len(v) for metric, v in by_metric.items()}


def report(run_dirs: list[str], output_dir: str, names: list[str] | None = None) -> tuple[Path, Path]:
    """Write `report.md` (per k, a table: rows = runs, columns = each benchmark's pass@k at the
    run's last evaluated step, and their mean) and `pass_at_k.png` (pass@k over training steps,
    one panel per benchmark, a line per run and k) into output_dir. Returns their paths."""
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    labels = names or _labels(run_dirs)
    runs = {label: read_run(run_dir) for label, run_dir in zip(labels, run_dirs)}
    metrics = sorted({key for scores in runs.values() for step in scores.values() for key in step})
    benchmarks = sorted({key.split("/")[0] for key in metrics} - {"mean"}) + ["mean"]
    ks = sorted({int(key.split("pass@")[1]) for key in metrics if "/pass@" in key})
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    markdown_path, png_path = output / "report.md", output / "pass_at_k.png"
    markdown_path.write_text(_markdown(runs, benchmarks, ks), encoding="utf-8")
    _plot(runs, benchmarks, ks, png_path)
    return markdown_path, png_path


def _labels(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, or its path as given where names repeat (version_0 ...)."""
    base = [Path(run_dir).name for run_dir in run_dirs]
    return base if len(set(base)) == len(base) else [str(run_dir) for run_dir in run_dirs]


def _markdown(runs: dict[str, Scores], benchmarks: list[str], ks: list[int]) -> str:
    lines = ["# pass@k", ""]
    for k in ks:
        lines += [f"## pass@{k} at each run's last evaluated step", ""]
        lines.append("| run | step | " + " | ".join(benchmarks) + " |")
        lines.append("|---|---:|" + "---:|" * len(benchmarks))
        for label, scores in runs.items():
            step = max(scores)
            cells = [_cell(scores[step].get(f"{name}/pass@{k}")) for name in benchmarks]
            lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


def _plot(runs: dict[str, Scores], benchmarks: list[str], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(benchmarks), 3)
    rows = math.ceil(len(benchmarks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, name in zip(axes.flat, benchmarks):
        for r, (label, scores) in enumerate(runs.items()):
            for j, k in enumerate(ks):
                points = sorted((step, v[f"{name}/pass@{k}"]) for step, v in scores.items() if f"{name}/pass@{k}" in v)
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, values, styles[j % len(styles)], marker="o", markersize=3,
                              color=colors[r % len(colors)], label=f"{label} pass@{k}")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_ylabel("pass@k")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(benchmarks):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize="small")
    figure.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-opd report",
        description="Markdown table and PNG plot of pass@k per benchmark for runs, or over a sweep (--sweep).",
    )
    parser.add_argument("runs", nargs="*", help="run directories (e.g. runs/opd_block64/version_0)")
    parser.add_argument("--output", required=True, help="directory for report.md and the PNGs")
    parser.add_argument("--names", nargs="+", help="a label per run (default: the directory names)")
    parser.add_argument("--sweep", help="a `lit-opd sweep` output directory: the table over variants × seeds")
    parser.add_argument("--baseline", default="opd", help="the sweep's variant the others are compared with")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.sweep):
        parser.error("give run directories or --sweep DIR, not both")
    try:
        if args.sweep:
            from lit_opd.sweep_report import sweep_report

            paths = sweep_report(args.sweep, args.output, args.baseline)
        else:
            paths = report(args.runs, args.output, args.names)
    except ValueError as error:  # the reports raise ValueError for their input only, naming the directory or file
        sys.exit(f"lit-opd: error: {' '.join(str(error).split())}")
    print(paths[0].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(path) for path in paths)}")
