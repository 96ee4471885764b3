"""Shared fixtures for the ingest tests: one tiny synthetic BIDS cohort per session (generated, never downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from longitudinal.settings import Settings

# 2 patients of the tiny preset (4 mm MNI grid): sub-001 has 5 visits, sub-002 has 4.
SEED = 0
N_PATIENTS = 2
KEY = "ingest-test-pseudonym-key"
SPACING_MM = 4.0


@pytest.fixture(scope="session")
def tiny_bids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from longitudinal.synth import generate_cohort

    root = tmp_path_factory.mktemp("tiny") / "bids"
    generate_cohort(root, N_PATIENTS, SEED, "tiny")
    return root


@pytest.fixture
def bids_copy(tiny_bids: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny cohort that a test may edit."""
    dst = tmp_path / "bids"
    shutil.copytree(tiny_bids, dst)
    return dst


def make_settings(tmp: Path) -> Settings:
    """Settings confined to ``tmp``: workspace, reports, a fixed pseudonym key, 4 mm grid (tiny preset)."""
    return Settings(home=tmp / "home", pseudonym_key=KEY, target_spacing_mm=SPACING_MM)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)
