"""Model registry: versions, the challenger/champion promotion gate, listing, and resolving model references.

Aliases, not stages. Every new version gets ``challenger``. It also gets ``champion`` only when it beats both
LCI and the current champion on the validation split (see ``gate``). The decision and its figures are stored
as version tags (``gate.*``), so ``longitudinal models list`` can show why a version is or is not champion.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from longitudinal.settings import Settings
from longitudinal.tracking import uri as uri_mod

CHALLENGER = "challenger"
CHAMPION = "champion"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


# --- the gate ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateMetrics:
    """Validation figures the gate compares (means over validation targets, all horizons pooled).

    dice_whole: whole-tumour Dice in [0, 1], higher is better.
    volume_error_ml: absolute whole-tumour volume error in ml, lower is better.
    n: number of validation targets behind the means.
    """

    dice_whole: float
    volume_error_ml: float
    n: int

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], model: str) -> GateMetrics:
        """The pooled row (``horizon == "all"``) of ``model``, else its per-horizon rows pooled by ``n``.

        Raises ValueError when the rows hold no finite figures for ``model``.
        """
        mine = [r for r in rows if r.get("model") == model]
        pooled = [r for r in mine if r.get("horizon") == "all"]
        n_tot, dice, verr = 0, 0.0, 0.0
        for r in pooled or mine:
            n = int(r.get("n", 0) or 0)
            d, v = r.get("dice_whole"), r.get("volume_error_ml")
            if n <= 0 or d is None or v is None or not (math.isfinite(d) and math.isfinite(v)):
                continue
            n_tot += n
            dice += n * float(d)
            verr += n * float(v)
        if n_tot == 0:
            raise ValueError(f"no validation figures for model {model!r} in the evaluation rows")
        return cls(dice / n_tot, verr / n_tot, n_tot)


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the promotion gate; ``reasons`` names every comparison that failed (empty when promoted)."""

    promote: bool
    candidate: GateMetrics
    lci: GateMetrics
    champion: GateMetrics | None
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        """Version tags recording the decision and the figures it was based on."""
        t = {
            "gate.decision": "promoted" if self.promote else "rejected",
            "gate.rule": "dice_whole > ref and volume_error_ml < ref, for ref in (lci, champion)",
            "gate.reasons": "; ".join(self.reasons) or "beats lci and champion",
            "gate.val_dice_whole": f"{self.candidate.dice_whole:.4f}",
            "gate.val_volume_error_ml": f"{self.candidate.volume_error_ml:.4f}",
            "gate.val_n": str(self.candidate.n),
            "gate.lci_dice_whole": f"{self.lci.dice_whole:.4f}",
            "gate.lci_volume_error_ml": f"{self.lci.volume_error_ml:.4f}",
        }
        if self.champion is not None:
            t["gate.champion_version"] = str(self.champion_version)
            t["gate.champion_dice_whole"] = f"{self.champion.dice_whole:.4f}"
            t["gate.champion_volume_error_ml"] = f"{self.champion.volume_error_ml:.4f}"
        return t


def gate(
    candidate: GateMetrics,
    lci: GateMetrics,
    champion: GateMetrics | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Promote only when the candidate has strictly higher Dice AND strictly lower volume error than LCI and
    than the current champion (when there is one), all measured on the same validation targets."""
    reasons = []
    for name, ref in (("lci", lci), ("champion", champion)):
        if ref is None:
            continue
        if not candidate.dice_whole > ref.dice_whole:
            reasons.append(f"dice_whole {candidate.dice_whole:.4f} <= {name} {ref.dice_whole:.4f}")
        if not candidate.volume_error_ml < ref.volume_error_ml:
            reasons.append(
                f"volume_error_ml {candidate.volume_error_ml:.4f} >= {name} {ref.volume_error_ml:.4f}"
            )
    return GateDecision(not reasons, candidate, lci, champion, champion_version, reasons)


# --- versions ------------------------------------------------------------------------------------------
def find_version_for_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of ``name`` registered from ``run_id``, if any (what makes registration idempotent)."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return sorted(found, key=lambda v: int(v.version))[0] if found else None


def register_version(
    client: MlflowClient, name: str, model_uri: str, run_id: str, model_id: str | None, tags: dict[str, str]
) -> tuple[ModelVersion, bool]:
    """Register ``model_uri`` under ``name`` exactly once per run. Returns (version, created)."""
    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        return existing, False
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
    return mv, True


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias`` or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def apply_decision(client: MlflowClient, name: str, version: str, decision: GateDecision) -> list[str]:
    """Tag the version with the decision, set ``challenger`` and, when promoted, ``champion``. Returns the
    aliases this version holds afterwards."""
    for k, v in decision.tags().items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return sorted(client.get_model_version(name, version).aliases)


@dataclass
class VersionInfo:
    """One row of ``longitudinal models list``."""

    name: str
    version: str
    aliases: list[str]
    kind: str
    run_id: str | None
    created: int
    decision: str
    val_dice_whole: str
    val_volume_error_ml: str
    source: str
    intervals: str = "-"  # the version tag written at registration (tracking.training.intervals_tag)


def list_versions(settings: Settings, name: str | None = None) -> list[VersionInfo]:
    """Every version of ``name`` (default Settings.registered_model_name), newest first."""
    name = name or settings.registered_model_name
    client = uri_mod.client(settings)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    # search results do not carry aliases on every backend; the registered model holds alias -> version.
    by_version: dict[str, list[str]] = {}
    for alias, ver in (client.get_registered_model(name).aliases or {}).items() if versions else []:
        by_version.setdefault(str(ver), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        t = v.tags or {}
        rows.append(
            VersionInfo(
                name=name,
                version=str(v.version),
                aliases=sorted(set(v.aliases or []) | set(by_version.get(str(v.version), []))),
                kind=t.get("model_kind", "?"),
                run_id=v.run_id,
                created=int(v.creation_timestamp or 0),
                decision=t.get("gate.decision", "-"),
                val_dice_whole=t.get("gate.val_dice_whole", "-"),
                val_volume_error_ml=t.get("gate.val_volume_error_ml", "-"),
                source=v.source,
                intervals=t.get("intervals", "-"),
            )
        )
    return rows


# --- references ----------------------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    """A model reference resolved to a local checkpoint.

    checkpoint: local path of the checkpoint (``longitudinal.models.checkpoint`` format).
    uri: the MLflow URI it came from (None for a local file).
    metadata: name, version, aliases, run_id, model_id, kind, tags -- whatever the registry knows.
    """

    checkpoint: Path
    uri: str | None
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d


_NAME_ALIAS = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
_NAME_VERSION = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)/(?P<version>\d+)$")


def _find_weights(root: Path) -> Path | None:
    hits = sorted(root.rglob(WEIGHTS_FILE))
    return hits[0] if hits else None


def _logged_model_for_run(client: MlflowClient, run_id: str, name: str | None) -> str:
    run = client.get_run(run_id)
    flt = f"source_run_id = '{run_id}'" + (f" AND name = '{name}'" if name else "")
    found = client.search_logged_models([run.info.experiment_id], filter_string=flt)
    if not found:
        raise ValueError(f"run {run_id} has no logged model" + (f" named {name!r}" if name else ""))
    return found[0].model_id


def resolve_model_ref(ref: str, settings: Settings) -> ResolvedModel:
    """Turn ``ref`` into a local checkpoint path plus registry metadata.

    Accepted forms: a local checkpoint file (or a folder holding ``weights.pt``, e.g. a downloaded MLflow
    model), ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/m-<id>`` and ``runs:/<run_id>[/<model name>]``. Downloads go to ``<home>/cache/models``.
    Raises ValueError with the accepted forms when ``ref`` matches none.
    """
    local = Path(ref).expanduser()
    if local.is_file():
        return ResolvedModel(local.resolve(), None, {"source": "local"})
    if local.is_dir() and (w := _find_weights(local)) is not None:
        return ResolvedModel(w.resolve(), None, {"source": "local"})

    client = uri_mod.client(settings)
    meta: dict[str, Any] = {}
    if m := _NAME_ALIAS.match(ref):
        model_uri = f"models:/{ref}"
    elif m := _NAME_VERSION.match(ref):
        model_uri = f"models:/{ref}"
    elif ref.startswith("models:/"):
        model_uri = ref
    elif ref.startswith("runs:/"):
        parts = ref[len("runs:/"):].strip("/").split("/", 1)
        model_id = _logged_model_for_run(client, parts[0], parts[1] if len(parts) > 1 else None)
        model_uri = f"models:/{model_id}"
        meta.update(run_id=parts[0], model_id=model_id)
    else:
        raise ValueError(
            f"cannot resolve model reference {ref!r}: not an existing file or folder, and not one of "
            "NAME@ALIAS, NAME/VERSION, models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, "
            "runs:/<run_id>[/<name>]"
        )

    body = model_uri[len("models:/"):]
    if m := (_NAME_ALIAS.match(body) or _NAME_VERSION.match(body)):
        name = m.group("name")
        try:
            mv = (client.get_model_version_by_alias(name, m.group("alias")) if "alias" in m.groupdict()
                  else client.get_model_version(name, m.group("version")))
        except MlflowException as exc:
            raise ValueError(f"no such registered model version: {ref} ({exc.message})") from exc
        meta.update(name=name, version=str(mv.version), aliases=sorted(mv.aliases or []), run_id=mv.run_id,
                    model_id=mv.model_id, tags=dict(mv.tags or {}), kind=(mv.tags or {}).get("model_kind"))
        cache_key = mv.model_id or f"{name}-v{mv.version}"
    else:
        meta.setdefault("model_id", body)
        cache_key = body

    dest = settings.home_dir / "cache" / "models" / re.sub(r"[^A-Za-z0-9_.\-]", "_", cache_key)
    weights = _find_weights(dest) if dest.exists() else None
    if weights is None:
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
        weights = _find_weights(dest)
        if weights is None:
            raise ValueError(f"{ref} resolved to {model_uri}, which holds no {WEIGHTS_FILE}")
    cfg = weights.parent / CONFIG_FILE
    if cfg.exists():
        meta.setdefault("kind", json.loads(cfg.read_text()).get("kind"))
    return ResolvedModel(weights.resolve(), model_uri, meta)
