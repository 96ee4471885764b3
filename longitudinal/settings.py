"""One place for every location and URI the project uses.

Values come from environment variables prefixed ``LONGITUDINAL_`` (or a CLI flag that overrides them).
``LONGITUDINAL_HOME`` is the workspace root; every default location lives under it, so nothing is ever
written wherever a command happens to run.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".longitudinal"

# Project channel names; sources map their own naming onto these.
CHANNELS: tuple[str, ...] = ("T1c", "FLAIR")

# BIDS entities -> project channel. Real datasets name contrasts differently, so this is configurable
# (LONGITUDINAL_BIDS_CHANNEL_MAP as JSON). Each value is a dict of BIDS entities that must all match.
DEFAULT_BIDS_CHANNEL_MAP: dict[str, dict[str, str]] = {
    "T1c": {"suffix": "T1w", "ce": "gd"},
    "FLAIR": {"suffix": "FLAIR"},
}

# Ingest limits: what a source file may be before ingest reads or decodes it (hostile or careless input must
# neither block nor exhaust the machine). 64 Mi voxels is a 512 x 512 x 256 volume, several times a clinical
# 3D brain MRI (256 x 256 x 176 at 1 mm: 11.5 M); 1 GiB on disk and 2 GiB decoded are far above such a scan.
DEFAULT_MAX_VOXELS = 1 << 26
DEFAULT_MAX_FILE_BYTES = 1 << 30
DEFAULT_MAX_IMAGE_BYTES = 2 << 30
# Earliest plausible scan date; the latest defaults to today + LATEST_DATE_MARGIN_DAYS.
DEFAULT_EARLIEST_DATE = dt.date(1900, 1, 1)
LATEST_DATE_MARGIN_DAYS = 366

# LUMIERE layout (``ingest/lumiere.py``): a file in a week folder (".nii.gz" added to a name without a NIfTI
# extension) -> channel; only the project CHANNELS are read. The segmentation's path is relative to the week
# folder; its label values map to the store's classes (DeepBraTumIA: 1 necrosis/non-enhancing, 2 enhancing,
# 3 oedema -> 1 oedema/non-enhancing, 2 enhancing). LUMIERE gives weeks, not dates: scan N of week W is dated
# LUMIERE_ANCHOR + 7 W + N - 1 days (then date-shifted like any source).
DEFAULT_LUMIERE_CHANNEL_MAP: dict[str, str] = {"CT1": "T1c", "T1": "T1", "T2": "T2", "FLAIR": "FLAIR"}
DEFAULT_LUMIERE_SEGMENTATION = "DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz"
DEFAULT_LUMIERE_LABEL_MAP: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 1}
LUMIERE_ANCHOR = dt.date(2000, 1, 3)
# Source layouts ingest reads; "auto" detects the layout (``ingest.sources.detect_kind``).
SOURCE_KINDS: tuple[str, ...] = ("auto", "bids", "manifest", "dicom", "lumiere")

# DICOM SeriesDescription (case-insensitive substring) -> project channel.
DEFAULT_DICOM_CHANNEL_MAP: dict[str, str] = {
    "t1c": "T1c",
    "t1 post": "T1c",
    "t1+c": "T1c",
    "t1w_gd": "T1c",
    "flair": "FLAIR",
}


# A generated key is 64 hex characters; an operator's own key must still be long enough not to be guessed.
MIN_PSEUDONYM_KEY_CHARS = 16


class PseudonymKeyError(RuntimeError):
    """The pseudonym key is missing, empty or too short; the message says how to restore it."""


def _read_key(path: Path) -> bytes:
    key = path.read_text(encoding="ascii", errors="replace").strip()
    if len(key) < MIN_PSEUDONYM_KEY_CHARS:
        raise PseudonymKeyError(
            f"pseudonym key {path} is {'empty' if not key else 'too short'} ({len(key)} characters). Pseudonyms "
            "made with it would be recomputable, so nothing is ingested or forecast. Restore the file from the "
            "site's backup (or set LONGITUDINAL_PSEUDONYM_KEY to the site's key). Delete it only if this "
            "workspace has never stored a patient: a new key gives every patient a new pseudonym."
        )
    return key.encode()


def load_or_create_key(path: Path) -> bytes:
    """The workspace's pseudonym key at ``path``, created atomically on first use.

    A new key is written to a temporary file in the same folder, fsynced, then hard-linked into place, so the key
    file is either absent or complete, and when several processes start at once exactly one key wins and every
    process reads that one. Raises :class:`PseudonymKeyError` when the file exists but is empty or short.
    """
    if path.exists():
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces: the first writer's key is the key
        except FileExistsError:
            pass
        try:  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


class Settings(BaseSettings):
    """Resolved locations and knobs. Build with ``Settings()`` (env) or ``Settings(home=...)`` (CLI flags)."""

    model_config = SettingsConfigDict(env_prefix="LONGITUDINAL_", extra="ignore")

    home: Path = Field(default=DEFAULT_HOME, description="Workspace root; all default locations live here.")
    store: str | None = Field(default=None, description="Cohort store URL (path or fsspec URL).")
    data_dir: Path | None = Field(default=None, description="Where `synth` writes the synthetic BIDS cohort.")
    runs_dir: Path | None = Field(default=None, description="Training runs: checkpoints, splits, logs.")
    reports_dir: Path | None = Field(default=None, description="Ingest QC reports and quarantine lists.")
    forecasts_dir: Path | None = Field(default=None, description="Default output folder of forecasts.")
    mlflow_tracking_uri: str | None = Field(default=None, description="Overrides MLFLOW_TRACKING_URI.")
    prefect_api_url: str | None = Field(default=None, description="Overrides PREFECT_API_URL.")
    pseudonym_key: str | None = Field(default=None, description="Secret key for patient pseudonyms.")
    target_spacing_mm: float = Field(default=2.0, gt=0, description="Isotropic spacing of the store (mm).")
    bids_channel_map: dict[str, dict[str, str]] = Field(default_factory=lambda: dict(DEFAULT_BIDS_CHANNEL_MAP))
    dicom_channel_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_DICOM_CHANNEL_MAP))
    source_kind: Literal["auto", "bids", "manifest", "dicom", "lumiere"] = Field(
        default="auto", description="Source layout ingest reads; auto detects it.")
    lumiere_channel_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LUMIERE_CHANNEL_MAP))
    lumiere_segmentation: str = Field(default=DEFAULT_LUMIERE_SEGMENTATION,
                                      description="Segmentation of a LUMIERE week folder, relative to it.")
    lumiere_label_map: dict[int, int] = Field(default_factory=lambda: dict(DEFAULT_LUMIERE_LABEL_MAP))
    registered_model_name: str = "tumor-growth-forecaster"
    tune_malloc: bool = Field(default=True, description="Keep freed large blocks in glibc's heap (runtime.py).")
    max_voxels: int = Field(default=DEFAULT_MAX_VOXELS, gt=0,
                            description="Most voxels in one source image, from its header, before decoding.")
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, gt=0,
                                description="Largest source file ingest reads (bytes on disk, by stat).")
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, gt=0,
                                 description="Largest decoded source image (bytes: voxels x bytes per voxel).")
    earliest_date: dt.date = Field(default=DEFAULT_EARLIEST_DATE, description="Earliest plausible scan date.")
    latest_date: dt.date | None = Field(default=None, description="Latest plausible scan date (default: today + "
                                        f"{LATEST_DATE_MARGIN_DAYS} days).")
    allowed_root: Path | None = Field(default=None, description="When set, ingest reads only files that resolve "
                                      "(symlinks followed) inside this folder.")

    # --- resolved locations -------------------------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def store_url(self) -> str:
        return self.store or str(self.home_dir / "cohort.zarr")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else self.home_dir / "data" / "synthetic"

    @property
    def runs_path(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir else self.home_dir / "runs"

    @property
    def reports_path(self) -> Path:
        return Path(self.reports_dir) if self.reports_dir else self.home_dir / "reports"

    @property
    def forecasts_path(self) -> Path:
        return Path(self.forecasts_dir) if self.forecasts_dir else self.home_dir / "forecasts"

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: explicit setting, else MLFLOW_TRACKING_URI, else sqlite under home."""
        return (
            self.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.home_dir / 'mlflow.db'}"
        )

    @property
    def mlflow_artifacts_path(self) -> Path:
        return self.home_dir / "mlartifacts"

    @property
    def prefect_url(self) -> str | None:
        return self.prefect_api_url or os.environ.get("PREFECT_API_URL")

    @cached_property
    def pseudonym_secret(self) -> bytes:
        """Key for keyed patient pseudonyms (at least ``MIN_PSEUDONYM_KEY_CHARS`` characters).

        From LONGITUDINAL_PSEUDONYM_KEY when set; otherwise a random key created once under the workspace
        (mode 0600), so pseudonyms are stable across runs of one site but unguessable elsewhere. An empty or
        short key is refused with :class:`PseudonymKeyError`, never used: with a weak key anyone could recompute
        the pseudonyms and undo the date shift.
        """
        if self.pseudonym_key is not None:
            key = self.pseudonym_key.strip()
            if len(key) < MIN_PSEUDONYM_KEY_CHARS:
                raise PseudonymKeyError(
                    f"LONGITUDINAL_PSEUDONYM_KEY is {'empty' if not key else 'too short'} ({len(key)} characters; "
                    f"at least {MIN_PSEUDONYM_KEY_CHARS} are needed). Set the site's key, or unset the variable "
                    f"to use the workspace key {self.pseudonym_key_path}."
                )
            return key.encode()
        return load_or_create_key(self.pseudonym_key_path)

    @property
    def pseudonym_key_path(self) -> Path:
        """Where the workspace's generated pseudonym key lives (used when no key is set explicitly)."""
        return self.home_dir / "secrets" / "pseudonym.key"

    def date_window(self) -> tuple[dt.date, dt.date]:
        """(earliest, latest) plausible scan date, both included; a session dated outside is quarantined."""
        latest = self.latest_date or dt.date.today() + dt.timedelta(days=LATEST_DATE_MARGIN_DAYS)
        return self.earliest_date, latest

    def locations(self) -> dict[str, str]:
        """Every location this settings object resolves to, for commands to print."""
        return {
            "home": str(self.home_dir),
            "store": self.store_url,
            "data": str(self.data_path),
            "runs": str(self.runs_path),
            "reports": str(self.reports_path),
            "forecasts": str(self.forecasts_path),
            "mlflow": self.tracking_uri,
            "prefect": self.prefect_url or "(ephemeral)",
        }


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with non-None CLI overrides applied on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
