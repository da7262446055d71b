"""Lightning callbacks of lit_opd (installed as `lit_opd.callbacks`)."""

from lit_opd.callbacks.export import ExportStudent
from lit_opd.callbacks.pass_at_k import PassAtKEvaluation

__all__ = ["ExportStudent", "PassAtKEvaluation"]
