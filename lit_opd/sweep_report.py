"""`lit-opd report --sweep DIR`: the papers' table and plots over a sweep (`lit-opd sweep`).

For each variant (DIR/<variant>/seed<s>/): pass@k per benchmark and their mean, mean ± std over
seeds, and the difference from the baseline variant with a 95% bootstrap interval that resamples
seeds and problems, paired by seed and problem (only the seeds both variants have). Every run is
read at the same step: the last step that every seed of every variant evaluated (`common_step`;
the table names it), so an unfinished run never mixes its early step with the others' last.
PNGs: eval/mean/pass@<k> against step with a band over seeds, and the gate statistics per variant.
"""

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

GATE_TAGS = ("train/gate_mean", "train/gate_min", "train/gate_max", "train/drift_abs_mean")
UNIT_TAGS = "train/gate_units/"  # DriftGate(unit_statistics=True): train/gate_units/<unit>/{std,min,max}
# {variant: {seed: {step: {benchmark: {problem index: {"pass@k": value}}}}}}
Problems = dict[str, dict[int, dict[int, dict[str, dict[int, dict[str, float]]]]]]


def read_sweep(sweep_dir: Path) -> Problems:
    """Every run's per-problem evaluation rows (its fit_step*.jsonl files)."""
    problems: Problems = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(dict))))
    for path in sorted(sweep_dir.glob("*/seed*/**/fit_step*.jsonl")):
        variant, seed = path.relative_to(sweep_dir).parts[:2]
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
                scores = {key: float(value) for key, value in row.items() if key.startswith("pass@")}
                problems[variant][int(seed.removeprefix("seed"))][int(row["step"])][row["benchmark"]][row["index"]] = scores
            except (json.JSONDecodeError, KeyError, ValueError) as error:
                raise ValueError(f"{path}:{line_number}: not an evaluation row ({error!r})") from None
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep directory {str(sweep_dir)!r} does not exist")
    if not problems:
        raise ValueError(f"{sweep_dir}: no runs with evaluation files (<variant>/seed<s>/.../fit_step*.jsonl)")
    return problems


def common_step(problems: Problems) -> int:
    """The last step that every seed of every variant evaluated."""
    steps = set.intersection(*(set(steps) for runs in problems.values() for steps in runs.values()))
    if not steps:
        reached = {f"{variant}/seed{seed}": max(steps) for variant, runs in problems.items() for seed, steps in runs.items()}
        raise ValueError(f"no step that every run evaluated (last evaluated steps: {reached})")
    return max(steps)


def step_matrix(runs: dict[int, dict], k: str, step: int, seeds: list[int]) -> dict[str, np.ndarray]:
    """{benchmark: [seeds, problems] pass@k of `seeds` (in that order) at `step`}."""
    benchmarks = sorted(runs[seeds[0]][step])
    return {b: np.array([[runs[seed][step][b][i][k] for i in sorted(runs[seed][step][b])] for seed in seeds])
            for b in benchmarks}


def mean_over_benchmarks(matrices: dict[str, np.ndarray], seeds: np.ndarray, rows: dict[str, np.ndarray]) -> float:
    return float(np.mean([m[np.ix_(seeds, rows[b])].mean() for b, m in matrices.items()]))


def paired_bootstrap(variant: dict[str, np.ndarray], baseline: dict[str, np.ndarray], resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, 2.5%, 97.5%) of the mean over benchmarks of pass@k, variant − baseline,
    resampling seeds and each benchmark's problems with replacement, the same draws for both."""
    rng = np.random.default_rng(seed)
    difference = {b: variant[b] - baseline[b] for b in baseline}
    seeds = next(iter(difference.values())).shape[0]
    all_rows = {b: np.arange(m.shape[1]) for b, m in difference.items()}
    estimate = mean_over_benchmarks(difference, np.arange(seeds), all_rows)
    draws = [mean_over_benchmarks(difference, rng.integers(0, seeds, seeds),
                                  {b: rng.integers(0, len(r), len(r)) for b, r in all_rows.items()})
             for _ in range(resamples)]
    return estimate, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def sweep_table(problems: Problems, baseline: str, ks: list[str]) -> str:
    """The markdown table: per variant and k, each benchmark's and the mean's mean ± std over seeds,
    and Δ from the baseline [95% CI]."""
    if baseline not in problems:
        raise ValueError(f"--baseline {baseline!r} is not a variant of the sweep ({', '.join(sorted(problems))})")
    step, lines = common_step(problems), []
    for k in ks:
        benchmarks = list(step_matrix(problems[baseline], k, step, sorted(problems[baseline])))
        lines += [f"### {k} at step {step}, the last step every seed of every variant evaluated (mean ± std over "
                  f"seeds; Δ vs {baseline}, 95% bootstrap CI over the seeds both have × problems)", "",
                  "| variant | seeds | " + " | ".join(benchmarks) + f" | mean | Δ {k} | paired seeds |",
                  "|---" * (len(benchmarks) + 5) + "|"]
        for variant, runs in problems.items():
            matrix = step_matrix(runs, k, step, sorted(runs))
            per_seed = {b: m.mean(axis=1) for b, m in matrix.items()}
            per_seed["mean"] = np.mean([per_seed[b] for b in benchmarks], axis=0)
            cells = [f"{per_seed[b].mean():.3f} ± {per_seed[b].std(ddof=1) if len(per_seed[b]) > 1 else 0:.3f}"
                     for b in [*benchmarks, "mean"]]
            paired = sorted(set(runs) & set(problems[baseline]))
            if variant == baseline:
                delta, paired_cell = "–", "–"
            elif not paired:
                delta, paired_cell = "no seed in common", "–"
            else:
                estimate, low, high = paired_bootstrap(step_matrix(runs, k, step, paired),
                                                       step_matrix(problems[baseline], k, step, paired))
                delta, paired_cell = f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]", ", ".join(map(str, paired))
            lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {delta} | {paired_cell} |")
        lines.append("")
    return "\n".join(lines)


def gate_statistics(sweep_dir: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{variant: {tag: {step: [value per seed]}}} of GATE_TAGS and the UNIT_TAGS from the runs'
    event files. UNIT_TAGS only at steps whose drift is not zero: on a rollout batch's first step
    π_θ is π_old, every unit weighs 1, and the step says nothing about the units."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in sorted(sweep_dir.glob("*/seed*/**/events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        variant = path.relative_to(sweep_dir).parts[0]
        tags = events.Tags()["scalars"]
        undrifted = {event.step for event in events.Scalars("train/drift_abs_mean") if event.value == 0.0} \
            if "train/drift_abs_mean" in tags else set()
        for tag in [tag for tag in tags if tag in GATE_TAGS or tag.startswith(UNIT_TAGS)]:
            for event in events.Scalars(tag):
                if not (tag.startswith(UNIT_TAGS) and event.step in undrifted):
                    stats[variant][tag][event.step].append(event.value)
    return stats


def unit_table(stats: dict[str, dict[str, dict[int, list[float]]]]) -> str:
    """Markdown: per variant that logged UNIT_TAGS, each unit's gate std, min and max on the same
    steps' drift, averaged over its steps with drift (`gate_statistics`) and seeds ("" when no run
    logged them)."""
    lines = []
    for variant, tags in stats.items():
        units = list(dict.fromkeys(tag.split("/")[2] for tag in tags if tag.startswith(UNIT_TAGS)))
        if not units:
            continue
        lines += [f"### Gate weights per unit on {variant}'s drift (mean over the steps with drift ≠ 0 and seeds)", "",
                  "| unit | std | min | max |", "|---|---|---|---|"]
        for unit in units:
            cells = [np.mean([v for values in tags[f"{UNIT_TAGS}{unit}/{name}"].values() for v in values])
                     for name in ("std", "min", "max")]
            lines.append(f"| {unit} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(problems: Problems, stats: dict, k: str, output: Path) -> list[Path]:
    """eval/mean/<k> against step with a min–max band over seeds, and the gate statistics `stats`
    (`gate_statistics`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant, runs in problems.items():
        steps = sorted(set.intersection(*(set(steps) for steps in runs.values())))
        curves = np.array([[np.mean([np.mean([scores[k] for scores in per_set.values()])
                                     for per_set in runs[seed][step].values()]) for step in steps] for seed in runs])
        axis.plot(steps, curves.mean(axis=0), label=variant)
        axis.fill_between(steps, curves.min(axis=0), curves.max(axis=0), alpha=0.2)
    axis.set(xlabel="optimiser step", ylabel=f"eval/mean/{k}", title=f"mean {k} over benchmarks (band: seeds)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    curve_path = output / f"sweep_{k.replace('@', '_at_')}.png"
    figure.savefig(curve_path, dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(1, len(GATE_TAGS), figsize=(4 * len(GATE_TAGS), 3.5), squeeze=False)
    for axis, tag in zip(axes[0], GATE_TAGS):
        for variant, tags in stats.items():
            if tag in tags:
                steps = sorted(tags[tag])
                axis.plot(steps, [np.mean(tags[tag][s]) for s in steps], label=variant)
        axis.set(title=tag, xlabel="optimiser step")
    axes[0][0].legend(fontsize="x-small")
    figure.tight_layout()
    gate_path = output / "sweep_gates.png"
    figure.savefig(gate_path, dpi=120)
    plt.close(figure)
    return [curve_path, gate_path]


def sweep_report(sweep_dir: str, output_dir: str, baseline: str) -> list[Path]:
    """Write report.md and the PNGs of the sweep in `sweep_dir` into `output_dir`."""
    problems = read_sweep(Path(sweep_dir))
    ks = sorted({key for runs in problems.values() for steps in runs.values() for step in steps.values()
                 for per_set in step.values() for scores in per_set.values() for key in scores},
                key=lambda key: int(key.split("@")[1]))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    markdown = output / "report.md"
    stats = gate_statistics(Path(sweep_dir))
    markdown.write_text(f"# Sweep {sweep_dir}\n\n" + "\n".join([sweep_table(problems, baseline, ks), unit_table(stats)]),
                        encoding="utf-8")
    return [markdown, *plot_sweep(problems, stats, ks[-1], output)]
