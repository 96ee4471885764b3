"""A tumour larger than the model's field of view (its crop): the CLI, the JSON summary and the plot say that the
forecast cannot be trusted; a tumour that fits gets no warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from forecasthelpers import KEY, Cohort, baseline_checkpoint
from PIL import Image
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.data.context import CropBox
from longitudinal.predict.fov import BORDER_SAMPLE_SHARE, border_share, box_at_border, field_of_view


def _forecast(cohort: Cohort, tmp_path: Path, crop: int, fov: str | None = None) -> tuple[object, dict, Path]:
    ckpt = baseline_checkpoint(tmp_path / f"linear{crop}{fov}.pt", crop=crop, fov=fov)
    out = tmp_path / f"out{crop}{fov}"
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:  # nothing lands where the command runs (no ./mlruns, ...)
        mp.chdir(cwd)
        res = _invoke(cohort, ckpt, out)
    assert list(cwd.iterdir()) == []
    assert res.exit_code == 0, res.output
    body = json.loads(next(out.glob("*_forecast.json")).read_text())
    return res, body, Path(body["plot"])


def _invoke(cohort: Cohort, ckpt: Path, out: Path) -> object:
    return CliRunner().invoke(
        app, ["--home", str(cohort.settings.home), "forecast", cohort.pids["sub-01"], "--store", cohort.store,
              "--in", "90", "--in", "400", "--model", str(ckpt), "--out", str(out)],
        env={"LONGITUDINAL_PSEUDONYM_KEY": KEY, "LONGITUDINAL_MLFLOW_TRACKING_URI": cohort.settings.tracking_uri,
             "COLUMNS": "100"})


def test_tumour_larger_than_the_crop_is_flagged_everywhere(cohort: Cohort, tmp_path: Path) -> None:
    # sub-01's tumour is 16 mm across at its last scan; a 6-voxel crop at 2 mm sees 12 mm of it.
    res, body, plot = _forecast(cohort, tmp_path, crop=6)
    fov = [q["field_of_view"] for q in body["queries"]]
    assert all(not f["ok"] and f["context_at_border"] for f in fov), fov
    assert fov[0]["crop_mm"] == [12.0, 12.0, 12.0] and min(fov[0]["tumour_mm"]) > 12.0
    assert "larger than the model's field of view" in fov[0]["warnings"][0]
    assert len(body["warnings"]) == 2 and all("not trustworthy" in w for w in body["warnings"])
    text = " ".join(res.output.split())  # the console wraps long lines
    assert "warning: not trustworthy" in text and "Do not use them" in text
    description = Image.open(plot).text["Description"]
    assert "not trustworthy" in description and "field of view" in description


def test_adaptive_field_of_view_holds_a_tumour_larger_than_the_crop(cohort: Cohort, tmp_path: Path) -> None:
    # An 8-voxel crop (16 mm at the store's 2 mm), adaptive: the stride grows until the 16 mm tumour plus 16 mm
    # of margin a side fit.
    res, body, _ = _forecast(cohort, tmp_path, crop=8, fov="adaptive")
    fov = [q["field_of_view"] for q in body["queries"]]
    assert all(f["ok"] for f in fov), fov
    assert fov[0]["crop_mm"][0] >= 16.0 + 2 * 16.0 and body["warnings"] == []
    assert not _forecast(cohort, tmp_path, crop=8)[1]["queries"][0]["field_of_view"]["ok"]


def test_tumour_inside_the_crop_gets_no_warning(cohort: Cohort, tmp_path: Path) -> None:
    res, body, plot = _forecast(cohort, tmp_path, crop=32)
    assert all(q["field_of_view"]["ok"] for q in body["queries"]), body["queries"]
    assert body["warnings"] == [] and "not trustworthy" not in res.output
    assert Image.open(plot).text["Description"] == "no warnings"
    # whole days in file names, never fractions of a day
    names = [Path(f).name for q in body["queries"] for f in q["files"].values()]
    assert all(n.split("_day")[1].split("_")[0].isdigit() for n in names), names


def test_field_of_view_signs() -> None:
    start, size = (10, 10, 10), (8, 8, 8)
    assert not box_at_border(((12, 12, 12), (16, 16, 16)), start, size)
    assert box_at_border(((10, 12, 12), (16, 16, 16)), start, size)  # touches the first face
    assert box_at_border(((12, 12, 12), (16, 16, 18)), start, size)  # reaches the last voxel
    assert not box_at_border(None, start, size)
    # probs [Q, S, 3, D, H, W]: query 0 stays inside, query 1 reaches the border in 1 of 2 samples
    probs = torch.zeros(2, 2, 3, 8, 8, 8)
    probs[:, :, 0] = 1.0
    probs[:, :, 0, 3:5, 3:5, 3:5], probs[:, :, 1, 3:5, 3:5, 3:5] = 0.0, 1.0
    probs[1, 0, 0, 3:5, 3:5, 7], probs[1, 0, 1, 3:5, 3:5, 7] = 0.0, 1.0
    np.testing.assert_allclose(border_share(probs), [0.0, 0.5])
    crop = CropBox(start, size)
    ok = field_of_view(crop, (2.0, 2.0, 2.0), [((12, 12, 12), (16, 16, 16))], 0.0, 32, 2.0, 4.096)
    assert ok.ok and ok.warnings() == [] and ok.tumour_mm == (8.0, 8.0, 8.0)
    bad = field_of_view(crop, (2.0, 2.0, 2.0), [None], BORDER_SAMPLE_SHARE, 10, 4.096, 4.096)
    assert not bad.ok and len(bad.warnings()) == 2 and "in 1 of 10 samples" in bad.warnings()[0]
    assert "capped at 4.1 ml" in bad.warnings()[1]
