"""Gates g_t that multiply the position losses: blockwise policy drift and SG-OPD's sign
consistency. Pure torch; every gate is detached.

Shapes: `mask` bool [B, T] (True on response tokens that count); every returned [B, T]
tensor is 0 where `mask` is False.
"""

from typing import Literal

import torch
from torch import Tensor

from lit_opd._checks import check_finite, check_mask, check_nonempty, check_same_shape
from lit_opd.setting_checks import check_range

Unit = Literal["token", "block", "span", "sequence"]
Aggregation = Literal["mean_abs", "mean", "max_abs", "rms"]


def unit_ids(
    mask: Tensor, unit: Unit, block_size: int = 64, span_ends: Tensor | None = None
) -> Tensor:
    """[B, T] long: the index of the unit (within its row) that each position belongs to.

    token: t. block: (t − t₀) // block_size, t₀ = the row's first masked-in position (positions
    before t₀ take block 0, they are masked out anyway). span: the number of span ends strictly
    before t (`span_ends` marks the last token of each span). sequence: 0.
    """
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)
    if unit == "token":
        return positions
    if unit == "block":
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        first = mask.long().argmax(dim=1, keepdim=True)
        return ((positions - first).clamp(min=0) // block_size).long()
    if unit == "span":
        if span_ends is None:
            raise ValueError("unit='span' needs span_ends (bool [B, T] marking each span's last token)")
        check_same_shape("mask", mask.shape, span_ends=span_ends)
        ends = span_ends.long()
        return torch.cumsum(ends, dim=1) - ends
    if unit == "sequence":
        return torch.zeros_like(positions)
    raise ValueError(f"unit must be 'token', 'block', 'span' or 'sequence', got {unit!r}")


def unit_drift(drift: Tensor, mask: Tensor, ids: Tensor, agg: Aggregation) -> Tensor:
    """D_u broadcast back to positions: [B, T], the aggregate of `drift` over the masked-in
    positions of each position's unit `ids`.

    mean_abs: mean |d|; mean: mean d; max_abs: max |d|; rms: sqrt(mean d²).
    """
    B, T = drift.shape
    m = mask.to(drift.dtype)
    if agg == "mean_abs":
        values = drift.abs()
    elif agg == "mean":
        values = drift
    elif agg == "rms":
        values = drift.square()
    elif agg == "max_abs":
        values = drift.abs()
    else:
        raise ValueError(f"agg must be 'mean_abs', 'mean', 'max_abs' or 'rms', got {agg!r}")
    values = values * m
    if agg == "max_abs":
        per_unit = torch.zeros(B, T, dtype=drift.dtype, device=drift.device)
        per_unit = per_unit.scatter_reduce(1, ids, values, reduce="amax", include_self=True)
        return per_unit.gather(1, ids)
    sums = torch.zeros(B, T, dtype=drift.dtype, device=drift.device).scatter_add(1, ids, values)
    counts = torch.zeros(B, T, dtype=drift.dtype, device=drift.device).scatter_add(1, ids, m)
    per_unit = sums / counts.clamp(min=1.0)
    if agg == "rms":
        per_unit = per_unit.sqrt()
    return per_unit.gather(1, ids)


def normalize_gate(
    raw: Tensor,
    mask: Tensor,
    g_min: float | None = None,
    g_max: float | None = None,
    residual_alpha: float | None = None,
    mean: Tensor | None = None,
) -> Tensor:
    """Mean-normalise a raw gate r over the valid positions: g = r / mean_m(r).

    `mean` overrides mean_m(r) (e.g. the mean over the global batch, reduced across ranks).
    residual_alpha α: g = 1 + α·(r/mean(r) − 1). Then clip to [g_min, g_max]. 0 off the mask.
    """
    raw = raw.detach()
    if mean is None:
        check_nonempty(mask)
        mean = (raw * mask).sum() / mask.sum()
    gate = raw / mean
    if residual_alpha is not None:
        gate = 1.0 + residual_alpha * (gate - 1.0)
    if g_min is not None or g_max is not None:
        gate = gate.clamp(min=g_min, max=g_max)
    return gate.masked_fill(~mask, 0.0)


def drift_log_gate(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    unit: Unit = "block",
    block_size: int = 64,
    span_ends: Tensor | None = None,
    agg: Aggregation = "mean_abs",
    sharpness: float = 1.0,
) -> Tensor:
    """log r_t = −λ·D_u(t), D_u the aggregated drift d = sg(logp − old_logp) over t's unit: [B, T],
    detached, 0 off the mask. The gates normalise in log space (`shifted_raw_gate`): r = exp(−λ·D)
    itself underflows to 0 for every unit once λ·D > ~87 in float32."""
    check_mask(mask)
    check_same_shape("mask", mask.shape, logp=logp, old_logp=old_logp)
    check_finite(mask, logp=logp, old_logp=old_logp)
    drift = (logp - old_logp).detach().masked_fill(~mask, 0.0)
    ids = unit_ids(mask, unit, block_size, span_ends)
    return (-sharpness * unit_drift(drift, mask, ids, agg)).masked_fill(~mask, 0.0)


def shifted_raw_gate(log_raw: Tensor, mask: Tensor, shift: Tensor) -> Tensor:
    """exp(log r − shift), 0 off the mask: r up to the constant factor exp(−shift), which the mean
    normalisation cancels; with shift = the largest log r the largest value is 1, so no unit
    underflows unless it is ~87 nats below the least drifted one (then its weight is 0, not NaN)."""
    return torch.exp((log_raw - shift).masked_fill(~mask, 0.0)).masked_fill(~mask, 0.0)


def drift_gate(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    unit: Unit = "block",
    block_size: int = 64,
    span_ends: Tensor | None = None,
    agg: Aggregation = "mean_abs",
    sharpness: float = 1.0,
    g_min: float | None = None,
    g_max: float | None = None,
    residual_alpha: float | None = None,
) -> Tensor:
    """Blockwise policy-drift gate (the "Block64" gate with unit='block', block_size=64).

    logp: [B, T] log π_θ(y_t); old_logp: [B, T] log π_old(y_t).
        d_t = sg(logp_t − old_logp_t);  D_u = agg_{t∈u, m_t} d_t;  r_t = exp(−sharpness·D_u(t))
        g_t = r_t / (Σ_m r / Σ_m 1)      (token-weighted mean over all masked-in positions)
    Optional residual form g = 1 + α(r/mean(r) − 1) and clip to [g_min, g_max]. Normalised in log
    space (`shifted_raw_gate`), so the gate stays finite for any drift.
    Returns [B, T], detached, 0 where mask is False.
    """
    check_mask(mask)
    check_nonempty(mask)
    log_raw = drift_log_gate(logp, old_logp, mask, unit, block_size, span_ends, agg, sharpness)
    raw = shifted_raw_gate(log_raw, mask, log_raw[mask].max())
    return normalize_gate(raw, mask, g_min, g_max, residual_alpha)


def sign_consistency_gate(
    logp: Tensor,
    teacher_logp: Tensor,
    correct: Tensor,
    mask: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    """SG-OPD sign-consistency gate.

    logp, teacher_logp: [B, T]; correct: bool [B] (verifier verdict per row). Pass the behaviour
    log-probs log π_old as `logp`: the teacher's direction is then sign(A_t), that of the update
    sampled-token OPD applies to the token.
        s_T,t = +1 if teacher_logp_t ≥ logp_t else −1;   s_V = +1 if correct else −1
        g_t = 1 + alpha where s_T,t = s_V (extrapolate), beta where they disagree (interpolate)
    Returns [B, T], detached, 0 where mask is False.
    """
    check_mask(mask)
    check_same_shape("mask", mask.shape, logp=logp, teacher_logp=teacher_logp)
    if correct.shape != mask.shape[:1]:
        raise ValueError(f"correct must be [B] = [{mask.shape[0]}], got shape {tuple(correct.shape)}")
    check_finite(mask, logp=logp, teacher_logp=teacher_logp)
    agree = sign_agreement(logp, teacher_logp, correct)
    gate = torch.full(mask.shape, beta, dtype=logp.dtype, device=logp.device).masked_fill(agree, 1.0 + alpha)
    return gate.masked_fill(~mask, 0.0)


def sign_agreement(logp: Tensor, teacher_logp: Tensor, correct: Tensor) -> Tensor:
    """bool [B, T]: the sign gate's decision, s_T,t = s_V (see `sign_consistency_gate`)."""
    teacher_up = teacher_logp.detach() >= logp.detach()
    return teacher_up == correct.bool()[:, None]


def global_masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """max over the masked-in positions of the global batch (all ranks; −inf where none)."""
    top = values.masked_fill(~mask, float("-inf")).max() if mask.numel() else values.new_tensor(float("-inf"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    return top


def global_masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_m values / Σ_m 1 over the global batch: summed across ranks when torch.distributed is
    initialised (every rank must call this, as every rank computes its gates each step)."""
    totals = torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("mask selects no position in the global batch: nothing to average over")
    return totals[0] / totals[1]


class Gate:
    """A gate as the training modules use it: `gate(batch, logp)` → detached [B, T] g_t.

    `batch` is a rollout mini-batch (keys: response_ids, response_mask, old_logp, teacher_logp,
    correct, ...); `logp` [B, T] is log π_θ of the sampled tokens. Gates are given in YAML by
    class_path and composed by product. A gate with `needs_verdicts` makes rollout collection
    verify every row (`batch["correct"]`, bool [B]); one with `reads_logp` (the default) reads
    the current log-probs `logp`, so a step cut into micro-batches computes them first.
    """

    needs_verdicts: bool = False
    reads_logp: bool = True

    def prepare(self, tokenizer) -> None:
        """Called once with the tokenizer before training (e.g. to find delimiter tokens)."""

    def __call__(self, batch: dict[str, Tensor], logp: Tensor) -> Tensor:
        raise NotImplementedError

    def statistics(self, batch: dict[str, Tensor], logp: Tensor) -> dict[str, Tensor]:
        """Scalars this gate logs each step, by TensorBoard tag (none by default)."""
        return {}


class DriftGate(Gate):
    """Policy-drift gate (`drift_gate`), mean-normalised in log space over the global batch (all
    ranks): the whole optimiser step when the module gives it the step's mini-batch.

    unit="span" splits the response after every token whose text contains `span_delimiter`
    (a blank line "\\n\\n" by default: one reasoning step per span).
    unit_statistics: also log what the gate would weigh, on the same step, with each unit
    (train/gate_units/<unit>/{std,min,max} over the mini-batch's response tokens; the mean is 1 by
    construction), to compare units on one run's drift.
    """

    units: tuple[Unit, ...] = ("token", "block", "span", "sequence")

    def __init__(
        self,
        unit: Unit = "block",
        block_size: int = 64,
        span_delimiter: str = "\n\n",
        agg: Aggregation = "mean_abs",
        sharpness: float = 1.0,
        g_min: float | None = None,
        g_max: float | None = None,
        residual_alpha: float | None = None,
        unit_statistics: bool = False,
    ):
        key = "model.init_args.gates: DriftGate"
        check_range(f"{key}.block_size", block_size, 1)
        check_range(f"{key}.sharpness", sharpness, 0)
        check_range(f"{key}.g_min", g_min, 0, optional=True)
        check_range(f"{key}.g_max", g_max, 0, low_open=True, optional=True)
        if g_min is not None and g_max is not None and g_min > g_max:
            raise ValueError(f"{key}.g_min must be ≤ g_max, got {g_min} > {g_max}")
        if not span_delimiter:
            raise ValueError(f"{key}.span_delimiter must be a non-empty string")
        self.unit, self.block_size, self.span_delimiter = unit, block_size, span_delimiter
        self.agg, self.sharpness = agg, sharpness
        self.g_min, self.g_max, self.residual_alpha = g_min, g_max, residual_alpha
        self.unit_statistics = unit_statistics
        self.delimiter_ids: Tensor | None = None

    def prepare(self, tokenizer) -> None:
        if self.unit != "span" and not self.unit_statistics:
            return
        vocab = tokenizer.get_vocab()
        ids = [i for token, i in vocab.items() if self.span_delimiter in tokenizer.convert_tokens_to_string([token])]
        if not ids:
            raise ValueError(f"no token of the tokenizer contains span_delimiter {self.span_delimiter!r} "
                             "(DriftGate's unit='span' and unit_statistics need it)")
        self.delimiter_ids = torch.tensor(sorted(ids))

    def span_ends(self, batch: dict[str, Tensor], unit: Unit) -> Tensor | None:
        if unit != "span":
            return None
        if self.delimiter_ids is None:
            raise ValueError("DriftGate(unit='span') needs prepare(tokenizer) before use")
        ids = batch["response_ids"]
        return torch.isin(ids, self.delimiter_ids.to(ids.device))

    def __call__(self, batch, logp):
        return self.weigh(batch, logp, self.unit)

    def weigh(self, batch: dict[str, Tensor], logp: Tensor, unit: Unit) -> Tensor:
        """The gate [B, T] with `unit` in place of this gate's own (the other settings kept)."""
        mask = batch["response_mask"]
        log_raw = drift_log_gate(
            logp, batch["old_logp"], mask, unit, self.block_size, self.span_ends(batch, unit), self.agg, self.sharpness
        )
        raw = shifted_raw_gate(log_raw, mask, global_masked_max(log_raw, mask))
        return normalize_gate(raw, mask, self.g_min, self.g_max, self.residual_alpha, mean=global_masked_mean(raw, mask))

    def statistics(self, batch, logp):
        if not self.unit_statistics:
            return {}
        mask = batch["response_mask"]
        stats = {}
        for unit in self.units:
            values = self.weigh(batch, logp, unit)[mask]
            prefix = f"train/gate_units/{unit}"
            stats |= {f"{prefix}/std": values.std(), f"{prefix}/min": values.min(), f"{prefix}/max": values.max()}
        return stats


class SignConsistencyGate(Gate):
    """SG-OPD's sign-consistency gate (`sign_consistency_gate`): 1 + alpha where the teacher's
    direction agrees with the verifier's, beta (0 ≤ beta < 1) where it does not.

    The teacher's direction is that of the update applied to the token, sign(A_t) with
    A_t = log π_T(y_t) − log π_old(y_t): it reads the behaviour log-probs `batch["old_logp"]`, not
    the current π_θ (on a reuse epoch π_θ may have moved past π_T while the applied update still
    pushes towards it). It needs verifier verdicts: rollout collection verifies every row when this
    gate is configured. On the Teacher-TopK loss the gate value is the λ of the target p*
    (`losses.topk_lsm(target_mix=...)`) instead of a factor. Logs train/sign_agree_fraction (the
    fraction of response tokens where the two directions agree) and, where the mini-batch holds
    teacher rollouts, train/teacher_rows/sign_agree_fraction.
    """

    needs_verdicts = True
    reads_logp = False

    def __init__(self, alpha: float = 0.5, beta: float = 0.5):
        check_range("model.init_args.gates: SignConsistencyGate.alpha", alpha, 0)
        check_range("model.init_args.gates: SignConsistencyGate.beta", beta, 0, 1, high_open=True)
        self.alpha, self.beta = alpha, beta

    def __call__(self, batch, logp):
        return sign_consistency_gate(
            batch["old_logp"], batch["teacher_logp"], batch["correct"], batch["response_mask"], self.alpha, self.beta
        )

    def statistics(self, batch, logp):
        mask = batch["response_mask"]
        agree = sign_agreement(batch["old_logp"], batch["teacher_logp"], batch["correct"]) & mask
        stats = {"train/sign_agree_fraction": agree.sum() / mask.sum().clamp(min=1)}
        teacher_rows = batch.get("from_teacher")
        if teacher_rows is not None and teacher_rows.any():
            stats["train/teacher_rows/sign_agree_fraction"] = agree[teacher_rows].sum() / mask[teacher_rows].sum().clamp(min=1)
        return stats
