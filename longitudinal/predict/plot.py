"""The volume plot of a forecast: observed label volumes over time, forecast medians with 80% and 95% bands (under
the recorded history and, for a counterfactual forecast, under the treatment plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longitudinal.predict.result import ForecastResult, ObservedScan, QueryForecast


def plot_volumes(result: ForecastResult, path: Path) -> Path:
    """Two panels (whole tumour, enhancing core), x = days since baseline, y = ml. Written with Agg.

    Queries whose forecast cannot be trusted (the tumour does not fit the model's field of view, ``predict.fov``)
    are marked with a red cross, the field of view's volume is drawn as a dotted line, a red banner names them,
    and the PNG's ``Description`` text chunk holds ``result.warnings()``. With a treatment plan
    (``predict.plan``) the forecast under the plan is drawn beside the one under the recorded history, each with
    its bands, the planned events are marked on the time axis (days since baseline), the title says
    "counterfactual", and ``Description`` starts with ``counterfactual: plan ...`` (days only)."""
    # The object API with the Agg canvas: no pyplot state, no GUI backend, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    obs = [o for o in result.observed if o.volume_whole_ml is not None]
    planned = [q.counterfactual for q in result.queries if q.counterfactual is not None]
    histories: list[tuple[list[QueryForecast], str, str]] = [
        (result.queries, "tab:blue", "recorded history: " if planned else "")]
    if planned:
        histories.append((planned, "tab:orange", "under the plan: "))
    for ax, kind, title in ((axes[0], "whole", "whole tumour"), (axes[1], "enhancing", "enhancing core")):
        if obs:
            ax.plot([o.days for o in obs], [getattr(o, f"volume_{kind}_ml") for o in obs], "o-", color="black",
                    label="observed")
        for queries, color, prefix in histories:
            _draw_forecast(ax, obs, queries, kind, color, prefix)
        for i, e in enumerate(result.plan):
            label = "planned treatment" if i == 0 else None
            if e.end_days > e.start_days:
                ax.axvspan(e.start_days, e.end_days, color="tab:green", alpha=0.12, label=label)
            else:
                ax.axvline(e.start_days, color="tab:green", linestyle="-.", linewidth=1.2, label=label)
        bad = [(q.days, getattr(q, f"volume_{kind}_ml").median) for qs, _, _ in histories for q in qs
               if not q.trusted]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] for b in bad], "x", color="red", markersize=12, mew=2.5,
                    label="not trustworthy")
            crop_ml = max(q.field_of_view.crop_ml for qs, _, _ in histories for q in qs
                          if q.field_of_view is not None)
            ax.axhline(crop_ml, color="red", linestyle=":", linewidth=1,
                       label=f"field of view ({crop_ml:.3g} ml)")
        ax.set_title(title)
        ax.set_xlabel("days since baseline")
        ax.set_ylabel("volume (ml)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=7 if planned else 8)
    version = f" v{result.version}" if result.version else ""
    plan = result.plan_description()
    suffix = f"\ncounterfactual: plan {plan}" if plan else ""
    fig.suptitle(f"{result.patient}: {result.model}{version}, {result.n_samples} samples{suffix}",
                 fontsize=10 if plan else None)
    warnings = result.warnings()
    if warnings:
        days = ", ".join(sorted({f"{q.days:.0f}" for qs, _, _ in histories for q in qs if not q.trusted}, key=float))
        fig.text(0.5, 0.845 if plan else 0.895,
                 f"NOT TRUSTWORTHY at day {days}: the tumour does not fit the model's field of view",
                 ha="center", va="center", color="white", fontsize=9, fontweight="bold",
                 bbox={"facecolor": "red", "edgecolor": "none", "pad": 3})
    # Fixed margins: tight_layout costs a third of the plot's time and the layout never changes.
    top = (0.79 if warnings else 0.86) - (0.05 if plan else 0.0)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=top, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([f"counterfactual: plan {plan}"] if plan else []) + warnings
    fig.savefig(path, dpi=100, metadata={"Description": "\n".join(lines) or "no warnings"})
    return path


def _draw_forecast(ax: Any, obs: list[ObservedScan], queries: list[QueryForecast], kind: str, color: str,
                   prefix: str) -> None:
    """One forecast's 80% / 95% bands and medians of ``kind`` ("whole" or "enhancing") on ``ax``; ``prefix``
    starts its legend labels (which history it forecasts under)."""
    qd = [q.days for q in queries]
    ivs = [getattr(q, f"volume_{kind}_ml") for q in queries]
    # Bands start at the last observed point so the eye follows the trajectory into the forecast.
    x, lo95, hi95, lo80, hi80, med = list(qd), [], [], [], [], []
    for iv in ivs:
        lo95.append(iv.lo95)
        hi95.append(iv.hi95)
        lo80.append(iv.lo80)
        hi80.append(iv.hi80)
        med.append(iv.median)
    if obs and qd and obs[-1].days < qd[0]:
        last = getattr(obs[-1], f"volume_{kind}_ml")
        x = [obs[-1].days, *x]
        for seq in (lo95, hi95, lo80, hi80, med):
            seq.insert(0, last)
    ax.fill_between(x, lo95, hi95, color=color, alpha=0.18, label=f"{prefix}95% interval")
    ax.fill_between(x, lo80, hi80, color=color, alpha=0.35, label=f"{prefix}80% interval")
    ax.plot(x, med, "--", color=color)
    ax.plot(qd, [iv.median for iv in ivs], "s", color=color, label=f"{prefix}forecast median")
