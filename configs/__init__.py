"""lit_opd's shipped configs (installed as `lit_opd.configs`): `defaults.yaml` under every
`lit-opd fit`, one file per variant, `quickstart/`, `strategies/`, `eval.yaml`."""

from importlib.resources import files
from pathlib import Path

ROOT = Path(str(files(__name__)))


def shipped_configs() -> list[str]:
    """Every shipped config by name: its path under configs/ without `.yaml`."""
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.rglob("*.yaml"))


def config_file(name: str) -> Path:
    """The path of the config `name`: an existing file as it is, else the shipped config of that
    name (`opd_block64`, `quickstart/base`, `strategies/fsdp2.yaml`, `configs/opd.yaml`)."""
    if Path(name).is_file():
        return Path(name)
    stem = name.removeprefix("configs/").removesuffix(".yaml")
    path = ROOT / f"{stem}.yaml"
    if not path.is_file():
        raise ValueError(f"--config {name}: no such file, and no shipped config of that name "
                         f"(shipped: {', '.join(shipped_configs())})")
    return path
