"""`lit-opd`: LightningCLI (fit | validate | test) plus `report` and `quickstart`."""

import sys

from lightning.pytorch.cli import LightningCLI

from lit_opd.data.prompts import PromptDataModule


class OPDCLI(LightningCLI):
    """LightningCLI with the tokenizer set once (data.tokenizer → model.init_args.tokenizer)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "report":
        from lit_opd.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "quickstart":
        from lit_opd.quickstart import main as quickstart_main

        return quickstart_main(argv[1:])
    OPDCLI(
        datamodule_class=PromptDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
