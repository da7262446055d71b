"""`lit-opd`'s subcommand table, shipped configs by name, and configs without copied blocks."""

import itertools
from pathlib import Path

import pytest

from lit_opd.cli import SUBCOMMANDS, main
from lit_opd.configs import config_file, shipped_configs
from lit_opd.lightning_cli import resolve_config_names

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand_and_shipped_config(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "report", "sweep", "quickstart", "serve-teacher"}
    assert all(f"  {name} " in out for name in SUBCOMMANDS)
    assert "opd_block64" in out and "quickstart/base" in out


def test_unknown_subcommand_is_a_one_line_error():
    with pytest.raises(SystemExit, match="unknown subcommand 'train'"):
        main(["train"])


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("opd_block64") == config_file("opd_block64.yaml") == config_file("configs/opd_block64.yaml")
    assert config_file("opd_block64").read_text() == (ROOT / "configs" / "opd_block64.yaml").read_text()
    (tmp_path / "mine.yaml").write_text("trainer: {max_steps: 1}\n")
    assert config_file("mine.yaml") == Path("mine.yaml")  # a file wins over a name
    args = resolve_config_names(["fit", "--config", "sg_opd", "-c=quickstart/base", "--config=mine.yaml",
                                 "--trainer.strategy", "strategies/fsdp2", "--trainer.strategy=ddp"])
    assert args == ["fit", "--config", str(config_file("sg_opd")), f"-c={config_file('quickstart/base')}",
                    "--config=mine.yaml",
                    "--trainer.strategy", str(config_file("strategies/fsdp2")), "--trainer.strategy=ddp"]


def test_an_unknown_config_name_is_a_one_line_error_naming_the_shipped_ones():
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "opd_blok64"])
    message = str(exit_info.value.code)
    assert message.startswith("lit-opd: error: --config opd_blok64: no such file") and "\n" not in message
    assert "opd_block64" in message


def longest_shared_block(a: list[str], b: list[str]) -> int:
    """The most consecutive identical lines (blank lines and comments aside) two files share."""
    best, lengths = 0, [0] * (len(b) + 1)
    for line in a:
        previous = 0
        for j, other in enumerate(b, start=1):
            previous, lengths[j] = lengths[j], (previous + 1 if line == other else 0)
            best = max(best, lengths[j])
    return best


def test_no_two_configs_share_a_block_of_more_than_ten_lines():
    files = {name: [line for line in config_file(name).read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")] for name in shipped_configs()}
    shared = {(a, b): longest_shared_block(files[a], files[b]) for a, b in itertools.combinations(files, 2)}
    assert max(shared.values()) <= 10, {pair: n for pair, n in shared.items() if n > 10}


def test_model_help_describes_every_settings_field(capsys, monkeypatch):
    """`lit-opd fit --model.help SampledTokenOPD` gives each key of RolloutConfig, OptimConfig,
    TeacherServing and VLLMSettings a description (from the dataclass docstring's Args: section)."""
    import dataclasses
    import re

    from lit_opd.modules import OptimConfig, RolloutConfig
    from lit_opd.rollout.teacher_engines import TeacherServing
    from lit_opd.rollout.vllm_engine import VLLMSettings

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "SampledTokenOPD"])
    out = capsys.readouterr().out
    prefixes = {"rollout": RolloutConfig, "optim": OptimConfig, "teacher_serving": TeacherServing,
                "rollout.vllm": VLLMSettings}
    undescribed = []
    for prefix, settings in prefixes.items():
        for field in dataclasses.fields(settings):
            if dataclasses.is_dataclass(field.type):
                continue  # a nested group (rollout.vllm): its fields are checked under their prefix
            entry = re.search(rf"^  --model\.{re.escape(prefix)}\.{field.name} .*?\n(.*?)\(type:", out, re.M | re.S)
            if entry is None or not entry.group(1).strip():
                undescribed.append(f"{prefix}.{field.name}")
    assert not undescribed, f"keys without a description in --model.help: {undescribed}"
