"""lit_opd: on-policy distillation for LLMs as PyTorch Lightning modules."""

__version__ = "0.1.0"
