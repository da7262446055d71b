"""What each variant of a sweep (`lit-opd sweep`) learned and how far its rollouts drifted: per
variant and evaluated step, pass@1 (= avg@n) and pass@k with their change from step 0 and a 95%
bootstrap interval (seeds and problems resampled, paired by seed and problem: the same draws for
both steps); from the runs' TensorBoard, the sampled reverse KL over the first and the last tenth
of the steps, and on the steps of the last reuse epoch (where drift is largest) the mean |drift|,
the gate's minimum and, for a DriftGate with unit_statistics, each unit's std and min.
Prints a markdown table, or JSON with --json. For issue #30's pilot and reuse grid:

    python benchmarks/sweep_gains.py granular/sweeps/cpu_pilot
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lit_opd.sweep_report import paired_bootstrap, read_sweep


def gains(sweep_dir: Path) -> dict[str, dict[int, dict[str, list[float]]]]:
    """{variant: {step: {"pass@k": [mean, Δ from step 0, low, high]}}} for every step after 0 that
    every seed of the variant evaluated."""
    result = {}
    for variant, runs in read_sweep(sweep_dir).items():
        seeds = sorted(runs)
        start, *later = sorted(set.intersection(*(set(runs[seed]) for seed in seeds)))

        def matrix(step: int, k: str) -> dict[str, np.ndarray]:
            """{benchmark: [seeds, problems]} of pass@k at `step`."""
            return {b: np.array([[runs[s][step][b][i][k] for i in sorted(runs[s][step][b])] for s in seeds])
                    for b in runs[seeds[0]][step]}

        first_problem = next(iter(next(iter(runs[seeds[0]][start].values())).values()))
        ks = sorted(first_problem, key=lambda k: int(k.removeprefix("pass@")))
        result[variant] = {start: {k: [float(np.mean([m.mean() for m in matrix(start, k).values()]))] for k in ks}}
        for step in later:
            result[variant][step] = {}
            for k in ks:
                end = matrix(step, k)
                delta, low, high = paired_bootstrap(end, matrix(start, k))
                result[variant][step][k] = [float(np.mean([m.mean() for m in end.values()])), delta, low, high]
    return result


def drift_statistics(sweep_dir: Path) -> dict[str, dict[str, float]]:
    """{variant: {statistic: mean over seeds}} from the runs' event files (see the module docstring)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    per_seed = defaultdict(lambda: defaultdict(list))
    for path in sorted(sweep_dir.glob("*/seed*/**/events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags()["scalars"])
        series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags if tag.startswith("train/")}
        if "train/reverse_kl" not in series:
            continue
        stats = per_seed[path.relative_to(sweep_dir).parts[0]]
        kl = [series["train/reverse_kl"][step] for step in sorted(series["train/reverse_kl"])]
        tenth = max(1, len(kl) // 10)
        stats["reverse_kl_first_tenth"].append(float(np.mean(kl[:tenth])))
        stats["reverse_kl_last_tenth"].append(float(np.mean(kl[-tenth:])))
        reuse = series.get("train/reuse_index", {})
        last_epoch = [step for step, value in reuse.items() if value == max(reuse.values())] if reuse else []
        for tag, value in series.items():
            if tag == "train/drift_abs_mean" or tag == "train/gate_min" or (
                    tag.startswith("train/gate_units/") and tag.endswith(("/std", "/min"))):
                values = [value[step] for step in last_epoch if step in value]
                if values:
                    stats[f"last_epoch/{tag.removeprefix('train/')}"].append(float(np.mean(values)))
    return {variant: {name: float(np.mean(values)) for name, values in stats.items()} for variant, stats in per_seed.items()}


def markdown(table: dict, drift: dict) -> str:
    ks = sorted({k for steps in table.values() for step in steps.values() for k in step}, key=lambda k: int(k.removeprefix("pass@")))
    names = {k: "avg@n (= pass@1)" if k == "pass@1" else k for k in ks}
    lines = ["| variant | step | " + " | ".join(f"{names[k]} | Δ {k} from step 0 [95% CI]" for k in ks) + " |",
             "|---|---|" + "---|---|" * len(ks)]
    for variant, steps in table.items():
        for step, scores in steps.items():
            cells = [f"{scores[k][0]:.3f} | " + (f"{scores[k][1]:+.3f} [{scores[k][2]:+.3f}, {scores[k][3]:+.3f}]"
                                                  if len(scores[k]) > 1 else "–") for k in ks]
            lines.append(f"| {variant} | {step} | " + " | ".join(cells) + " |")
    statistics = sorted({name for stats in drift.values() for name in stats})
    if statistics:
        lines += ["", "| variant | " + " | ".join(statistics) + " |", "|---|" + "---|" * len(statistics)]
        lines += [f"| {variant} | " + " | ".join(f"{stats[n]:.3f}" if n in stats else "–" for n in statistics) + " |"
                  for variant, stats in drift.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's output_dir (<variant>/seed<s>/ run directories)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    table, drift = gains(args.sweep_dir), drift_statistics(args.sweep_dir)
    print(json.dumps({"gains": table, "drift": drift}, indent=1) if args.json else markdown(table, drift))


if __name__ == "__main__":
    main()
