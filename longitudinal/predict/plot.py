"""The volume plot of a forecast: observed label volumes over time, forecast medians with 80% and 95% bands."""

from __future__ import annotations

from pathlib import Path

from longitudinal.predict.result import ForecastResult


def plot_volumes(result: ForecastResult, path: Path) -> Path:
    """Two panels (whole tumour, enhancing core), x = days since baseline, y = ml. Written with Agg.

    Queries whose forecast cannot be trusted (the tumour does not fit the model's field of view, ``predict.fov``)
    are marked with a red cross, the field of view's volume is drawn as a dotted line, a red banner names them,
    and the PNG's ``Description`` text chunk holds ``result.warnings()``."""
    # The object API with the Agg canvas: no pyplot state, no GUI backend, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    obs = [o for o in result.observed if o.volume_whole_ml is not None]
    qd = [q.days for q in result.queries]
    for ax, kind, title in ((axes[0], "whole", "whole tumour"), (axes[1], "enhancing", "enhancing core")):
        ivs = [getattr(q, f"volume_{kind}_ml") for q in result.queries]
        if obs:
            ax.plot([o.days for o in obs], [getattr(o, f"volume_{kind}_ml") for o in obs], "o-", color="black",
                    label="observed")
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
        ax.fill_between(x, lo95, hi95, color="tab:blue", alpha=0.18, label="95% interval")
        ax.fill_between(x, lo80, hi80, color="tab:blue", alpha=0.35, label="80% interval")
        ax.plot(x, med, "--", color="tab:blue")
        ax.plot(qd, [iv.median for iv in ivs], "s", color="tab:blue", label="forecast median")
        bad = [(q.days, getattr(q, f"volume_{kind}_ml").median) for q in result.queries if not q.trusted]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] for b in bad], "x", color="red", markersize=12, mew=2.5,
                    label="not trustworthy")
            crop_ml = max(q.field_of_view.crop_ml for q in result.queries if q.field_of_view is not None)
            ax.axhline(crop_ml, color="red", linestyle=":", linewidth=1,
                       label=f"field of view ({crop_ml:.3g} ml)")
        ax.set_title(title)
        ax.set_xlabel("days since baseline")
        ax.set_ylabel("volume (ml)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    version = f" v{result.version}" if result.version else ""
    fig.suptitle(f"{result.patient}: {result.model}{version}, {result.n_samples} samples")
    warnings = result.warnings()
    if warnings:
        days = ", ".join(f"{q.days:.0f}" for q in result.queries if not q.trusted)
        fig.text(0.5, 0.895, f"NOT TRUSTWORTHY at day {days}: the tumour does not fit the model's field of view",
                 ha="center", va="center", color="white", fontsize=9, fontweight="bold",
                 bbox={"facecolor": "red", "edgecolor": "none", "pad": 3})
    # Fixed margins: tight_layout costs a third of the plot's time and the layout never changes.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.79 if warnings else 0.86, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Description": "\n".join(warnings) or "no warnings"})
    return path
