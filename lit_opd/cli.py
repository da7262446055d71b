"""`lit-opd`: one table of subcommands.

    lit-opd fit --config opd_block64            train a variant (LightningCLI; --help for every key)
    lit-opd validate|test --config eval.yaml     pass@k of a checkpoint or a plain HF model
    lit-opd report RUN [RUN ...] --output DIR    markdown table and plot of pass@k over runs
    lit-opd report --sweep DIR --output OUT      the table and plots over a sweep's variants × seeds
    lit-opd sweep GRID.yaml                      a grid of variants × seeds, run after run, resumable
    lit-opd quickstart                           the offline end-to-end demo on a CPU
    lit-opd serve-teacher TEACHER --top-k 32     `vllm serve` of a teacher for --model.init_args.teacher_url
"""

import sys
from collections.abc import Callable
from typing import NamedTuple

from lit_opd import quickstart, report, sweep
from lit_opd.rollout import teacher_server
from lit_opd.configs import shipped_configs
from lit_opd.lightning_cli import run_lightning


class Subcommand(NamedTuple):
    run: Callable[[list[str]], object]
    help: str
    lightning: bool = False


SUBCOMMANDS = {
    "fit": Subcommand(run_lightning, "train a variant from configs (LightningCLI)", lightning=True),
    "validate": Subcommand(run_lightning, "pass@k of a checkpoint or a plain HF model", lightning=True),
    "test": Subcommand(run_lightning, "the same as validate, logged as test", lightning=True),
    "report": Subcommand(report.main, "markdown table and plot of pass@k for runs, or over a sweep"),
    "sweep": Subcommand(sweep.main, "a grid of variants × seeds from one YAML, run after run, resumable"),
    "quickstart": Subcommand(quickstart.main, "the offline end-to-end demo: data, SFT, OPD, pass@k on a CPU"),
    "serve-teacher": Subcommand(teacher_server.main, "`vllm serve` of a teacher with the prompt log-probs scoring needs"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<13} {command.help}" for name, command in SUBCOMMANDS.items())
    return (f"usage: lit-opd <subcommand> [options]   (lit-opd <subcommand> --help for its options)\n\n"
            f"subcommands:\n{rows}\n\nshipped configs (--config NAME): {', '.join(shipped_configs())}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command = SUBCOMMANDS.get(argv[0])
    if command is None:
        sys.exit(f"lit-opd: error: unknown subcommand {argv[0]!r}\n{usage()}")
    command.run(argv if command.lightning else argv[1:])
