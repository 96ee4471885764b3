"""Forecast quality on the project's synthetic cohort: synthesise -> ingest -> train -> evaluate held-out patients.

Every stage is cached under --work (the BIDS cohort, the store, each model's run folder, which resumes), so the
benchmark can be re-run or extended cheaply. Training uses the tuned default TrainConfig as is; only the
wall-clock budget comes from --budget-s. Evaluation forecasts every later scan of the held-out (test split)
patients from their earlier scans and prints the per-horizon table with lci, linear and every trained model.

The personalised Fisher-Kolmogorov model ``fk`` (fitted per target from its context scans, with the store's
tissue maps and treatments) is scored on the same targets, and a last table gives each model's volume error
over fk's per bin (``--no-fk`` leaves it out).

Target: tfm beats lci on whole-tumour Dice and on volume error in every horizon bin of 90 days or
more, and its advantage (the absolute gain over lci: Dice points and ml of volume error) grows with the
horizon; the relative skill 1 - err/err_lci is printed beside it. Target: the calibrated 80% / 95% volume
intervals cover the truth within 10 points of nominal in every bin with >= 3 targets (calibration is fitted on the
validation split at the end of training, never on these test patients); the raw-sample coverage is printed
beside it. Coherence: the fraction of sampled trajectories whose volume never shrinks over a grid of gaps.

    .venv/bin/python benchmarks/forecast_quality.py                        # 64 patients, 1500 s budget
    .venv/bin/python benchmarks/forecast_quality.py --patients 6 --budget-s 60 --preset tiny   # smoke run

The figures in docs/RESULTS.md come from 128 patients, so that calibration (19 validation patients) and test
(26) rest on more patients than the default 64 give (10 and 13): the cohort is built once, each run then trains
in its own process on one torch thread, two side by side on 2 cores, and a last call scores them together
(``--score-only``: as trained, without resuming them). Repeat --patients on every call (the cached cohort is
rebuilt when it differs):

    .venv/bin/python benchmarks/forecast_quality.py --work W --patients 128 --models '' --train-only
    for k in tfm np; do for t in aware blind; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forecast_quality.py \
        --work W --patients 128 --models $k --treatment $t --train-only & done; wait; done
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/forecast_quality.py --work W --patients 128 --treatment both \
        --no-fk --score-only

More held-out patients: ``--runs-from W`` scores the runs trained under W, as they are, on every patient of
--work's cohort, one of another --seed that they never saw (refused if any patient was in their training or
validation split); its tables and targets.csv are written under --work:

    .venv/bin/python benchmarks/forecast_quality.py --work F --patients 40 --seed 1 --models '' --train-only
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/forecast_quality.py --work F --patients 40 --seed 1 \
        --runs-from W --models tfm,np --treatment both --no-fk

Treatment: every table is printed for all targets, then for targets whose gap holds no treatment event and for
those whose gap holds one (``longitudinal.evaluation.strata``); ``<work>/targets.csv`` has one row per (patient,
target, model). ``--treatment both`` also trains each kind's treatment-blind setting (``treatment_aware: false``, run
``<kind>_blind``) and prints, per stratum and bin with at least 10 targets, the aware-minus-blind and
aware-minus-lci differences of Dice and volume error with 95% bootstrap intervals over patients. Every kind
whose checkpoint holds a serving policy is also scored as served (``<kind>_served``: the baseline the policy
chose where it chose one), against the better of lci and linear per bin. Target (treatment): in the treated
stratum, aware beats blind and lci on both figures in every bin with at least 10 targets; in the untreated
stratum, aware is no worse than blind beyond the interval; 80% / 95% coverage within 10 points per stratum and
bin; the served model no worse than the better of lci and linear in every bin, treated and untreated alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/forecast_quality"))
    ap.add_argument("--patients", type=int, default=64,
                    help="cohort size; with the default 15%% val / 20%% test split, 64 gives 41 train, 13 test")
    ap.add_argument("--preset", default="default", help="synth preset (default | tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=1500.0, help="training wall-clock budget per model (s)")
    ap.add_argument("--models", default="tfm,np", help="trainable kinds to train and score (skipped if absent)")
    ap.add_argument("--config", type=Path, help="TrainConfig YAML/JSON (default: the tuned default)")
    ap.add_argument("--samples", type=int, default=8, help="forecast samples per target for sampled models")
    ap.add_argument("--ingest-workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="rows JSON (default: <work>/forecast_quality.json)")
    ap.add_argument("--no-fk", dest="fk", action="store_false",
                    help="leave out the personalised Fisher-Kolmogorov reference (fitted per target: slow)")
    ap.add_argument("--treatment", choices=("aware", "blind", "both"), default="aware",
                    help="train / score each kind's default (treatment-aware) setting, its treatment-blind setting "
                         "(run <kind>_blind), or both and compare them (blind runs train separately in parallel)")
    ap.add_argument("--score-only", action="store_true",
                    help="score the runs already trained under --work as they are (their best checkpoints), "
                         "without resuming them")
    ap.add_argument("--runs-from", type=Path,
                    help="score the runs trained under this other work folder (as --score-only) on EVERY patient of "
                         "--work's cohort: a cohort of another --seed that those runs never saw, so more held-out "
                         "patients than their own test split")
    ap.add_argument("--train-only", action="store_true",
                    help="stop after training (train kinds in separate runs, then score them together with a run "
                         "without this flag: finished runs are reused)")
    args = ap.parse_args()
    if args.runs_from is not None:
        if args.train_only:
            ap.error("--runs-from scores runs trained elsewhere: it cannot be combined with --train-only")
        args.score_only = True

    import longitudinal.models  # noqa: F401  (registers every model kind)
    from longitudinal.evaluation.harness import EvalConfig, evaluate_models
    from longitudinal.ingest import ingest_cohort
    from longitudinal.models.base import MODEL_KINDS, build_model
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.predict import Predictor
    from longitudinal.settings import Settings
    from longitudinal.synth import generate_cohort
    from longitudinal.training.config import load_train_config
    from longitudinal.training.fit import fit
    from longitudinal.training.logger import JsonlLogger
    from storage.store import CohortStore

    console = Console()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=work / "home")
    timings: dict[str, float] = {}

    # 1. synthesise (cached on its parameters)
    bids = work / "bids"
    params = {"patients": args.patients, "seed": args.seed, "preset": args.preset}
    marker = work / "synth.json"
    if not (marker.exists() and json.loads(marker.read_text()) == params):
        t = time.perf_counter()
        console.print(f"synthesising {args.patients} patients ({args.preset}) into {bids}")
        generate_cohort(bids, args.patients, args.seed, args.preset,
                        progress=lambda d, n: console.print(f"  synth {d}/{n}") if d and d % 8 == 0 else None)
        marker.write_text(json.dumps(params))
        timings["synth_s"] = time.perf_counter() - t
        (work / "ingest.json").unlink(missing_ok=True)

    # 2. ingest (cached: the store is rebuilt only after a new synth)
    store_url = str(work / "cohort.zarr")
    imarker = work / "ingest.json"
    if not imarker.exists():
        t = time.perf_counter()
        console.print(f"ingesting into {store_url}")
        report = ingest_cohort(bids, store_url, settings, workers=args.ingest_workers)
        imarker.write_text(json.dumps({"stored": report.stored, "seconds": report.seconds}))
        timings["ingest_s"] = time.perf_counter() - t
    n_store = len(CohortStore.open(store_url).patient_ids())
    console.print(f"store: {n_store} patients")

    # 3. train each requested trainable kind with the default config (resumes a cached run); --treatment adds each
    # kind's treatment-blind setting as <kind>_blind (--treatment)
    cfg = load_train_config(args.config, budget_s=args.budget_s)
    trained: dict[str, object] = {}
    served: dict[str, Predictor] = {}
    split = None
    runs = []
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        if kind not in MODEL_KINDS:
            console.print(f"[yellow]model kind {kind!r} is not registered; skipped[/yellow]")
            continue
        options = dict(cfg.model_options) if kind == cfg.model else {}
        if args.treatment in ("aware", "both"):
            runs.append((kind, kind, options))
        if args.treatment in ("blind", "both"):
            runs.append((f"{kind}_blind", kind, {**options, "treatment_aware": False}))
    runs_root = (args.runs_from.resolve() if args.runs_from else work) / "runs"
    for name, kind, options in runs:
        run = runs_root / name
        t = time.perf_counter()
        if args.score_only:
            from longitudinal.data.splits import Split

            path = next((q for q in (run / "checkpoints" / "best.pt", run / "model.pt") if q.exists()), None)
            if path is None:
                raise SystemExit(f"--score-only: {run} holds no trained checkpoint")
            run_split = Split.load(run / "split.json")
            ckpt = Checkpoint.load(path)
            console.print(f"{name}: {path} (step {ckpt.provenance.get('step')})")
        else:
            res = fit(cfg.model_copy(update={"model": kind, "model_options": options}),
                      store_url, run, JsonlLogger(run), progress=lambda m, k=name: console.print(f"  [{k}] {m}"))
            timings[f"train_{name}_s"] = time.perf_counter() - t
            run_split = res.split
            ckpt = Checkpoint.load(res.checkpoint)
            console.print(f"{name}: {res.steps} steps in {res.wall_s:.0f} s, best val Dice "
                          f"{res.best_metric if res.best_metric is None else round(res.best_metric, 3)}; "
                          f"train/val/test = {len(res.split.train)}/{len(res.split.val)}/{len(res.split.test)}")
        if split is not None and run_split.split_id != split.split_id:
            raise SystemExit(f"{name} was trained on another split ({run_split.split_id} != {split.split_id})")
        split = run_split
        trained[name] = ckpt.build()
        if ckpt.provenance.get("serving") and not name.endswith("_blind"):
            served[f"{name}_served"] = Predictor.from_checkpoint(ckpt)
    if split is None:
        from longitudinal.data.splits import cohort_order_keys, make_split

        split = make_split(CohortStore.open(store_url).patient_ids(), cfg.seed, cfg.val_fraction, cfg.test_fraction,
                           order_keys=cohort_order_keys(store_url))

    if args.train_only:
        return
    held_out = list(split.test)
    if args.runs_from is not None:
        # Every patient of this cohort is held out from those runs; none may be one they trained or chose on.
        held_out = list(CohortStore.open(store_url).patient_ids())
        seen = set(held_out) & (set(split.train) | set(split.val))
        if seen:
            raise SystemExit(f"--runs-from: {len(seen)} patients of {store_url} were in those runs' training or "
                             "validation split; use a cohort of another --seed")
    # 4. evaluate on the held-out patients, every model beside lci, linear and the physical reference fk (fitted
    # per patient from its context scans, with the store's tissue maps and treatments; nothing trained)
    t = time.perf_counter()
    ecfg = EvalConfig(crop_size=tuple(cfg.crop_size), max_context=cfg.max_context, normalize=cfg.normalize,
                      n_samples=args.samples, seed=cfg.seed)
    scored = {**trained, **served, "fk": build_model("fk")} if args.fk else {**trained, **served}
    report = evaluate_models(scored, store_url, held_out, ecfg, progress=_every_tenth(console))
    timings["evaluate_s"] = time.perf_counter() - t
    out = report.to_json(args.json or work / "forecast_quality.json")

    from longitudinal.commands.train import print_strata_tables
    from longitudinal.evaluation.strata import write_targets_csv

    console.print(f"forecast quality: {report.n_targets} targets of {len(report.patients)} held-out patients "
                  + (f"(every patient of {store_url}; runs of {args.runs_from})" if args.runs_from
                     else f"(split {split.split_id})"))
    print_strata_tables(report)
    console.print(f"rows: {out}; per-target rows: {write_targets_csv(report.records, work / 'targets.csv')}")
    console.print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    for kind in trained:
        _verdict(console, report.rows, kind)
    if args.fk:
        _versus_fk(console, report.rows, [k for k in ("lci", "linear", *trained) if k != "fk"])
    for name in trained:
        if f"{name}_blind" in trained:
            _treatment_verdict(console, report, name)
    for name in served:
        _served_verdict(console, report, name)

    # 5. temporal coherence of the sampled trajectories on the same held-out patients
    from longitudinal.evaluation.coherence import trajectory_coherence

    coherence = {}
    for kind, model in trained.items():
        if model.stochastic and not kind.endswith("_blind"):
            c = trajectory_coherence(kind, model, store_url, held_out, crop_size=tuple(cfg.crop_size),
                                     max_context=cfg.max_context, normalize=cfg.normalize,
                                     n_samples=args.samples, seed=cfg.seed)
            coherence[kind] = c.__dict__
            console.print(f"{kind}: {c.monotone_fraction:.1%} of {c.n_trajectories} sampled trajectories "
                          f"({c.n_patients} patients x {args.samples}) never shrink over gaps {list(c.grid_days)} d")
    (work / "coherence.json").write_text(json.dumps(coherence, indent=2))


def _versus_fk(console: Console, rows: list[dict], kinds: list[str]) -> None:
    """Per horizon bin: each model's whole-tumour volume error (ml) over fk's on the same targets (< 1: the
    model beats the physical reference; fk's error itself in the first column)."""
    from rich.table import Table

    fk = {r["horizon"]: r for r in rows if r["model"] == "fk"}
    table = Table(title="volume error relative to fk (model / fk; < 1 beats fk)", title_justify="left")
    for col in ("horizon", "n", "fk ml", *kinds):
        table.add_column(col, justify="right")
    for horizon, ref in fk.items():
        err = ref.get("volume_error_ml", float("nan"))
        cells = []
        for kind in kinds:
            mine = next((r for r in rows if r["model"] == kind and r["horizon"] == horizon), None)
            ratio = mine["volume_error_ml"] / err if mine and ref["n"] and err > 0 else float("nan")
            cells.append(f"{ratio:.2f}")
        table.add_row(horizon, str(ref["n"]), f"{err:.1f}", *cells)
    console.print(table)


def _verdict(console: Console, rows: list[dict], kind: str) -> None:
    """Print whether ``kind`` meets the issue's target against lci."""
    bins = [r for r in rows if r["model"] == kind and r["horizon"] != "all" and r["horizon_lo"] >= 90 and r["n"]]
    lci = {r["horizon"]: r for r in rows if r["model"] == "lci"}
    beats = [(r["dice_whole"] > lci[r["horizon"]]["dice_whole"]
              and r["volume_error_ml"] < lci[r["horizon"]]["volume_error_ml"]) for r in bins]

    def rising(xs: list[float]) -> bool:
        return all(b >= a for a, b in zip(xs, xs[1:], strict=False))

    # The advantage is the absolute gain over lci (Dice points, ml of volume error): the target. The relative
    # skill 1 - err/err_lci is printed beside it; it can fall with the horizon while the gain grows, since
    # lci's own error grows.
    gain_dice = [r["dice_whole"] - lci[r["horizon"]]["dice_whole"] for r in bins]
    gain_vol = [lci[r["horizon"]]["volume_error_ml"] - r["volume_error_ml"] for r in bins]
    skill_dice = [r.get("skill_dice_whole", float("nan")) for r in bins]
    skill_vol = [r.get("skill_volume_error_ml", float("nan")) for r in bins]
    grows = rising(gain_dice) and rising(gain_vol)
    console.print(f"{kind}: beats lci (Dice and volume error) in {sum(beats)}/{len(beats)} bins >= 90 days; "
                  f"advantage over lci by bin: Dice +{[round(g, 3) for g in gain_dice]} "
                  f"({'grows' if rising(gain_dice) else 'does not grow'}), volume error -"
                  f"{[round(g, 1) for g in gain_vol]} ml ({'grows' if rising(gain_vol) else 'does not grow'}) "
                  f"-> {'TARGET MET' if beats and all(beats) and grows else 'TARGET MISSED'}")
    console.print(f"{kind}: relative skill by bin (not the target): Dice {[round(x, 2) for x in skill_dice]} "
                  f"({'grows' if rising(skill_dice) else 'does not grow'}), volume error "
                  f"{[round(x, 2) for x in skill_vol]} ({'grows' if rising(skill_vol) else 'does not grow'})")
    # Calibration target: 80% / 95% coverage within 10 points of nominal in every bin with >= 3 targets.
    cal_bins = [r for r in rows if r["model"] == kind and r["horizon"] != "all" and r["n"] >= 3
                and r.get("coverage80") is not None]
    if cal_bins:
        ok = all(abs(r["coverage80"] - 0.8) <= 0.1 and abs(r["coverage95"] - 0.95) <= 0.1 for r in cal_bins)
        per_bin = ", ".join(f"{r['horizon']}: {r['coverage80']:.2f}/{r['coverage95']:.2f} "
                            f"(raw {r['coverage80_raw']:.2f}/{r['coverage95_raw']:.2f}, n={r['n']})"
                            for r in cal_bins)
        console.print(f"{kind}: coverage 80%/95% by bin {per_bin} -> "
                      f"{'CALIBRATION TARGET MET' if ok else 'CALIBRATION TARGET MISSED'} (within 10 points)")


def _every_tenth(console: Console):
    """A progress callback for "evaluated d/n targets" messages that prints about every tenth of the way."""
    shown = [-1]

    def progress(message: str) -> None:
        try:
            done, total = (int(x) for x in message.split()[1].split("/"))
        except (IndexError, ValueError):
            console.print(f"  {message}")
            return
        if done * 10 // total > shown[0]:
            shown[0] = done * 10 // total
            console.print(f"  {message}")
    return progress


MIN_TARGETS = 10  # bins with fewer targets per stratum are printed but not judged


def _judged_bins(report, stratum: str, model: str) -> list[tuple[str, float, float, int]]:
    """(label, lo, hi, n) of the horizon bins with at least MIN_TARGETS targets of ``model`` in ``stratum``."""
    from longitudinal.evaluation.strata import stratum_rows

    rows = [r for r in stratum_rows(report) if r["stratum"] == stratum and r["model"] == model
            and r["horizon"] != "all" and r["n"] >= MIN_TARGETS]
    return [(r["horizon"], r["horizon_lo"], float("inf") if r["horizon_hi"] is None else r["horizon_hi"], r["n"])
            for r in rows]


def _diff_text(d) -> str:
    return f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]"


def _treatment_verdict(console: Console, report, kind: str) -> None:
    """Treatment-aware ``kind`` against its blind setting and lci, per stratum and judged bin: mean differences
    (aware minus other) of Dice and volume error with 95% patient-bootstrap intervals, then the targets."""
    from rich.table import Table

    from longitudinal.evaluation.strata import STRATUM_LABELS, paired_difference, stratum_rows

    blind = f"{kind}_blind"
    rows = stratum_rows(report)
    verdicts = []
    for stratum in ("treated", "untreated"):
        table = Table(title=f"{kind} (treatment-aware) minus {blind} and minus lci, {STRATUM_LABELS[stratum]}: "
                            "mean [95% bootstrap interval over patients]; Dice up and |dV| down favour the aware "
                            "model", title_justify="left")
        for col in ("horizon", "n", "Dice - blind", "|dV| ml - blind", "Dice - lci", "|dV| ml - lci",
                    "cov80", "cov95"):
            table.add_column(col, justify="right")
        ok_all = True
        bins = _judged_bins(report, stratum, kind)
        for label, lo, hi, n in bins:
            d = {(other, key): paired_difference(report.records, kind, other, key, stratum, lo, hi)
                 for other in (blind, "lci") for key in ("dice_whole", "volume_error_ml")}
            row = next(r for r in rows if r["stratum"] == stratum and r["model"] == kind and r["horizon"] == label)
            cov_ok = (abs(row.get("coverage80", float("nan")) - 0.8) <= 0.1
                      and abs(row.get("coverage95", float("nan")) - 0.95) <= 0.1)
            if stratum == "treated":
                ok = all(d[(o, "dice_whole")].mean > 0 and d[(o, "volume_error_ml")].mean < 0 for o in (blind, "lci"))
            else:  # no worse than blind beyond the interval: the interval reaches the favourable side
                ok = d[(blind, "dice_whole")].hi >= 0 and d[(blind, "volume_error_ml")].lo <= 0
            ok_all = ok_all and ok and cov_ok
            table.add_row(label, str(n), _diff_text(d[(blind, "dice_whole")]), _diff_text(d[(blind, "volume_error_ml")]),
                          _diff_text(d[("lci", "dice_whole")]), _diff_text(d[("lci", "volume_error_ml")]),
                          f"{row.get('coverage80', float('nan')):.2f}", f"{row.get('coverage95', float('nan')):.2f}")
        console.print(table)
        verdicts.append(f"{STRATUM_LABELS[stratum]}: {'MET' if bins and ok_all else 'MISSED'} "
                        f"({len(bins)} bins with >= {MIN_TARGETS} targets)")
    console.print(f"{kind}: treatment target -> " + "; ".join(verdicts))


def _served_verdict(console: Console, report, name: str) -> None:
    """The served model (serving policy applied) against the better of lci and linear per stratum and bin:
    Dice minus the best baseline Dice and volume error minus the best baseline error, with intervals."""
    from rich.table import Table

    from longitudinal.evaluation.strata import REPORT_STRATA, STRATUM_LABELS, paired_difference, stratum_rows

    rows = stratum_rows(report)
    table = Table(title=f"{name} minus the better of lci and linear in each bin: mean [95% bootstrap interval "
                        "over patients]", title_justify="left")
    for col in ("stratum", "horizon", "n", "best Dice", "Dice - best", "best |dV|", "|dV| ml - best"):
        table.add_column(col, justify="right")
    misses = []
    for stratum in REPORT_STRATA:
        for label, lo, hi, n in _judged_bins(report, stratum, name):
            base = {m: next(r for r in rows if r["stratum"] == stratum and r["model"] == m and r["horizon"] == label)
                    for m in ("lci", "linear")}
            best_dice = max(base, key=lambda m: base[m]["dice_whole"])
            best_vol = min(base, key=lambda m: base[m]["volume_error_ml"])
            dd = paired_difference(report.records, name, best_dice, "dice_whole", stratum, lo, hi)
            dv = paired_difference(report.records, name, best_vol, "volume_error_ml", stratum, lo, hi)
            if dd.mean < 0 or dv.mean > 0:
                misses.append(f"{stratum} {label}")
            table.add_row(STRATUM_LABELS[stratum], label, str(n), best_dice, _diff_text(dd), best_vol, _diff_text(dv))
    console.print(table)
    console.print(f"{name}: no worse than the better of lci and linear (means) -> "
                  f"{'MET' if not misses else 'MISSED in ' + ', '.join(misses)}")


if __name__ == "__main__":
    main()
