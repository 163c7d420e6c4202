"""The completeness certificate of an attribution (docs/design.md §1).

:class:`Completeness` holds what :func:`explaind_tl.explain` measured (the output change, by
forward passes in float64) against what it attributed, per step and in total, and the bound each
was compared with. It depends on nothing else in explaind_tl; :class:`explaind_tl.Attribution`
carries one and saves it with its values.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def _t64(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _max(x: Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def _mean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def _rel(num: Tensor, den: Tensor) -> Tensor:
    """``|num| / |den|`` with a guard: denominators below 1e-12 of the largest count as that."""
    num, den = num.abs(), den.abs()
    if den.numel() == 0:
        return num
    floor = max(float(den.max()) * 1e-12, 1e-300)
    return num / den.clamp_min(floor)


@dataclass
class Completeness:
    """The certificate of an attribution: measured vs attributed change, total and per step.

    The verdict: step ``s`` passes when ``|step_residual[s, r]| <= step_bound[s, r]`` for every
    row ``r``; the certificate is ``ok`` when every step passes and the total residual is within
    ``total_bound``. ``step_bound`` is the bound :func:`explaind_tl.explain` compared each step
    against (``tol * |step change| + 16 * eps * Σ_p |φ_p Δ_p| + 8 * eps64 * logit scale``, see
    :func:`explaind_tl.quadrature.residual_tolerance`), summed over query chunks. A certificate
    without bounds (files saved by older versions) has ``ok``, ``step_ok`` and ``failed_steps``
    ``None``: unknown, not passed.

    Attributes:
        measured: ``[R]`` ``q(w_b) - q(w_a)`` per resolved row (``R = 1`` when aggregated).
        attributed: ``[R]`` sum of all entries of the attribution per row.
        step_measured: ``[S, R]`` ``q(w_{s+1}) - q(w_s)``.
        step_residual: ``[S, R]`` ``step_measured`` minus the attributed change of step ``s``.
        nodes: ``[S]`` quadrature nodes used per step.
        refined_steps: number of steps that needed more nodes than the starting number.
        update_residual: contribution of the update-reconstruction error (also an explicit
            entry of the values when there is a ``"source"``/``"train"`` axis).
        tol: the relative tolerance the steps were held to (``None``: not recorded).
        step_bound: ``[S, R]`` the bound each step's residual was compared against (``None``:
            not recorded).
        total_bound: ``[R]`` the bound of the total residual: the sum of the step bounds plus
            an allowance for the float64 rounding of assembling the entries (default, when
            ``step_bound`` is given: the sum of the step bounds).
        steps: ``[S]`` the step index of each row of the ``step_*`` tensors (default
            ``0 .. S-1``; :func:`explain` records ``a .. b-1``).
    """

    measured: Float[Tensor, " row"]
    attributed: Float[Tensor, " row"]
    step_measured: Float[Tensor, "step row"]
    step_residual: Float[Tensor, "step row"]
    nodes: Int[Tensor, " step"]
    refined_steps: int = 0
    update_residual: float = 0.0
    tol: float | None = None
    step_bound: Float[Tensor, "step row"] | None = None
    total_bound: Float[Tensor, " row"] | None = None
    steps: Int[Tensor, " step"] | None = None

    def __post_init__(self) -> None:
        self.measured = _t64(self.measured).reshape(-1)
        self.attributed = _t64(self.attributed).reshape(-1)
        self.step_measured = _t64(self.step_measured)
        self.step_residual = _t64(self.step_residual)
        if self.step_measured.ndim == 1:
            self.step_measured = self.step_measured[:, None]
        if self.step_residual.ndim == 1:
            self.step_residual = self.step_residual[:, None]
        self.nodes = torch.as_tensor(self.nodes, dtype=torch.long).reshape(-1)
        self.refined_steps = int(self.refined_steps)
        self.update_residual = float(self.update_residual)
        self.tol = None if self.tol is None else float(self.tol)
        n_steps = self.step_residual.shape[0]
        if self.step_bound is not None:
            self.step_bound = _t64(self.step_bound)
            if self.step_bound.ndim == 1:
                self.step_bound = self.step_bound[:, None]
            if self.step_bound.shape != self.step_residual.shape:
                raise ValueError(
                    f"step_bound has shape {tuple(self.step_bound.shape)} but step_residual "
                    f"{tuple(self.step_residual.shape)}"
                )
            if self.total_bound is None:
                self.total_bound = self.step_bound.sum(0)
        if self.total_bound is not None:
            self.total_bound = _t64(self.total_bound).reshape(-1)
            if self.total_bound.shape != self.measured.shape:
                raise ValueError(
                    f"total_bound has {self.total_bound.numel()} rows but measured {self.measured.numel()}"
                )
        if self.steps is None:
            self.steps = torch.arange(n_steps)
        self.steps = torch.as_tensor(self.steps, dtype=torch.long).reshape(-1)
        if self.steps.numel() != n_steps:
            raise ValueError(f"steps has {self.steps.numel()} entries but the certificate {n_steps} steps")

    @property
    def residual(self) -> Float[Tensor, " row"]:
        """``measured - attributed`` per row."""
        return self.measured - self.attributed

    # ------------------------------------------------------------------ verdict
    @property
    def step_ok(self) -> Bool[Tensor, " step"] | None:
        """``[S]`` whether every row of each step is within its bound (``None``: no bounds).

        A NaN residual or bound fails.
        """
        if self.step_bound is None:
            return None
        return (self.step_residual.abs() <= self.step_bound).all(-1)

    @property
    def total_ok(self) -> bool | None:
        """Whether every row's total residual is within ``total_bound`` (``None``: no bound)."""
        if self.total_bound is None:
            return None
        return bool((self.residual.abs() <= self.total_bound).all())

    @property
    def ok(self) -> bool | None:
        """True when every step and the total are within their bounds; ``None`` when unknown."""
        step_ok = self.step_ok
        if step_ok is None or self.total_bound is None:
            return None
        return bool(step_ok.all()) and bool(self.total_ok)

    @property
    def failed_steps(self) -> list[int] | None:
        """Step indices (``steps`` labels) whose residual exceeds its bound (``None``: unknown)."""
        step_ok = self.step_ok
        if step_ok is None:
            return None
        return self.steps[~step_ok].tolist()

    def worst(self) -> dict[str, float | int] | None:
        """The step entry with the largest ``|residual| / bound``.

        Returns:
            ``{"step", "row", "residual", "bound", "ratio"}`` (``residual`` absolute), or
            ``None`` without bounds or steps.
        """
        if self.step_bound is None or self.step_residual.numel() == 0:
            return None
        r = self.step_residual.abs()
        ratio = r / self.step_bound.clamp_min(1e-300)
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
        i = int(torch.argmax(ratio))
        s, row = divmod(i, r.shape[1])
        return {
            "step": int(self.steps[s]),
            "row": row,
            "residual": float(r[s, row]),
            "bound": float(self.step_bound[s, row]),
            "ratio": float(ratio[s, row]),
        }

    def worst_total(self) -> dict[str, float | int] | None:
        """The row whose total residual is largest relative to its bound.

        Returns:
            ``{"row", "residual", "bound"}`` (``residual`` absolute), or ``None`` without a bound.
        """
        if self.total_bound is None or self.residual.numel() == 0:
            return None
        r = int(torch.argmax(self.residual.abs() / self.total_bound.clamp_min(1e-300)))
        return {"row": r, "residual": float(self.residual[r].abs()), "bound": float(self.total_bound[r])}

    def verdict(self) -> str:
        """One line: whether the certificate holds, and where it does not."""
        ok = self.ok
        if ok is None:
            return "certificate: not checked (no bounds recorded; saved by an older version?)"
        tol = f"tol={self.tol:.3g}" if self.tol is not None else "its tolerance"
        if ok:
            return f"certificate: OK, all {len(self.steps)} steps and the total within their bounds ({tol})"
        failed = self.failed_steps or []
        w = self.worst()
        parts = [f"certificate: FAILED, {len(failed)} of {len(self.steps)} steps above their bound ({tol})"]
        if failed:
            shown = ", ".join(str(s) for s in failed[:10]) + (", ..." if len(failed) > 10 else "")
            parts.append(
                f"steps [{shown}]; worst: step {w['step']}, |residual| {w['residual']:.3g} > bound "
                f"{w['bound']:.3g} ({w['ratio']:.3g}x)"
            )
        if not self.total_ok:
            t = self.worst_total()
            parts.append(f"total |residual| {t['residual']:.3g} above its bound {t['bound']:.3g}")
        return "; ".join(parts)

    def summary(self) -> dict[str, float | int | bool | None]:
        """Absolute and relative residuals of the total and per step, and the verdict.

        Returns:
            dict with ``total_max_abs``, ``total_mean_abs``, ``total_max_rel``, ``total_mean_rel``
            (per row, relative to ``|measured|``), ``total_rel`` (``Σ|residual| / Σ|measured|``
            over rows), ``step_max_abs``, ``step_mean_abs``, ``step_max_rel``, ``step_mean_rel``
            (per step and row, relative to ``|step_measured|``; denominators are floored at
            1e-12 of the largest), ``refined_steps``, ``max_nodes``, ``update_residual``,
            ``tol``, ``ok`` (``None``: unknown), ``failed_steps`` (how many; ``None``: unknown)
            and ``step_max_ratio`` (largest ``|residual| / bound``; ``None``: unknown).
        """
        tot = self.residual.abs()
        trel = _rel(tot, self.measured)
        den = float(self.measured.abs().sum())
        total_rel = (
            float(tot.sum()) / den if den > 0 else (0.0 if float(tot.sum()) == 0 else math.inf)
        )
        sr = self.step_residual.abs()
        srel = _rel(sr, self.step_measured)
        failed = self.failed_steps
        worst = self.worst()
        return {
            "total_max_abs": _max(tot),
            "total_mean_abs": _mean(tot),
            "total_max_rel": _max(trel),
            "total_mean_rel": _mean(trel),
            "total_rel": total_rel,
            "step_max_abs": _max(sr),
            "step_mean_abs": _mean(sr),
            "step_max_rel": _max(srel),
            "step_mean_rel": _mean(srel),
            "refined_steps": self.refined_steps,
            "max_nodes": int(self.nodes.max()) if self.nodes.numel() else 0,
            "update_residual": self.update_residual,
            "tol": self.tol,
            "ok": self.ok,
            "failed_steps": None if failed is None else len(failed),
            "step_max_ratio": None if worst is None else worst["ratio"],
        }

    def to_frame(self):
        """Per-step ``pandas.DataFrame``: one row per (step, row) with ``step``, ``row``,
        ``measured``, ``residual``, ``bound`` (NaN when not recorded), ``ok`` (``None`` when
        not recorded) and ``nodes``."""
        import pandas as pd

        S, R = self.step_residual.shape
        bound = self.step_bound if self.step_bound is not None else torch.full((S, R), math.nan, dtype=torch.float64)
        ok = (
            (self.step_residual.abs() <= self.step_bound).reshape(-1).tolist()
            if self.step_bound is not None
            else [None] * (S * R)
        )
        return pd.DataFrame(
            {
                "step": self.steps.repeat_interleave(R).numpy(),
                "row": torch.arange(R).repeat(S).numpy(),
                "measured": self.step_measured.reshape(-1).numpy(),
                "residual": self.step_residual.reshape(-1).numpy(),
                "bound": bound.reshape(-1).numpy(),
                "ok": pd.Series(ok, dtype=object),
                "nodes": self.nodes.repeat_interleave(R).numpy(),
            }
        )

    def _rows(self) -> list[tuple[str, str, str]]:
        s = self.summary()
        return [
            ("total", f"{s['total_max_abs']:.3g}", f"{s['total_max_rel']:.3g}"),
            ("per step (max)", f"{s['step_max_abs']:.3g}", f"{s['step_max_rel']:.3g}"),
            ("per step (mean)", f"{s['step_mean_abs']:.3g}", f"{s['step_mean_rel']:.3g}"),
        ]

    def _tail(self) -> str:
        s = self.summary()
        return (
            f"measured {float(self.measured.sum()):.6g}, attributed {float(self.attributed.sum()):.6g}; "
            f"{self.step_measured.shape[0]} steps, refined {s['refined_steps']}, max nodes "
            f"{s['max_nodes']}, update residual {s['update_residual']:.3g}"
        )

    def __str__(self) -> str:
        lines = [f"{'residual':<16}{'abs':>12}{'rel':>12}"]
        lines += [f"{a:<16}{b:>12}{c:>12}" for a, b, c in self._rows()]
        lines.append(self._tail())
        lines.append(self.verdict())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in self._rows())
        ok = self.ok
        color = "gray" if ok is None else ("green" if ok else "red")
        return (
            "<table><tr><th>residual</th><th>abs</th><th>rel</th></tr>"
            f"{rows}</table><p>{self._tail()}</p>"
            f'<p style="color:{color}"><b>{html.escape(self.verdict())}</b></p>'
        )

    def to_tensors(self, prefix: str = "completeness/") -> dict[str, Tensor]:
        out = {
            f"{prefix}measured": self.measured.contiguous(),
            f"{prefix}attributed": self.attributed.contiguous(),
            f"{prefix}step_measured": self.step_measured.contiguous(),
            f"{prefix}step_residual": self.step_residual.contiguous(),
            f"{prefix}nodes": self.nodes.contiguous(),
            f"{prefix}steps": self.steps.contiguous(),
        }
        if self.step_bound is not None:
            out[f"{prefix}step_bound"] = self.step_bound.contiguous()
        if self.total_bound is not None:
            out[f"{prefix}total_bound"] = self.total_bound.contiguous()
        return out

    def scalars(self) -> dict[str, Any]:
        """The JSON-able scalars that :meth:`to_tensors` leaves out."""
        return {"refined_steps": self.refined_steps, "update_residual": self.update_residual, "tol": self.tol}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], scalars: dict, prefix: str = "completeness/",
        first_step: int = 0,
    ) -> Completeness:
        """Inverse of :meth:`to_tensors` (+ :meth:`scalars`). Tensors missing from older files
        stay ``None`` (verdict unknown); ``first_step`` labels the steps when they are absent."""
        S = tensors[f"{prefix}step_residual"].shape[0]
        steps = tensors.get(f"{prefix}steps")
        return cls(
            measured=tensors[f"{prefix}measured"],
            attributed=tensors[f"{prefix}attributed"],
            step_measured=tensors[f"{prefix}step_measured"],
            step_residual=tensors[f"{prefix}step_residual"],
            nodes=tensors[f"{prefix}nodes"],
            refined_steps=scalars.get("refined_steps", 0),
            update_residual=scalars.get("update_residual", 0.0),
            tol=scalars.get("tol"),
            step_bound=tensors.get(f"{prefix}step_bound"),
            total_bound=tensors.get(f"{prefix}total_bound"),
            steps=steps if steps is not None else torch.arange(first_step, first_step + S),
        )


__all__ = ["Completeness"]
