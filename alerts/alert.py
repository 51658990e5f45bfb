"""The alert record: the product's output, on the alerts topic and in the alerts table."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

__all__ = ["Alert", "alert_id_for"]

_NAMESPACE = uuid.UUID("4f1f5f0e-7a53-4d0c-9d55-61727477a1e7")


def alert_id_for(kind: str, subject_event_id: str) -> str:
    """Deterministic id: the same evidence can never raise two alerts.

    Examples
    --------
    >>> alert_id_for("sale_outlier", "e1") == alert_id_for("sale_outlier", "e1")
    True
    """
    return str(uuid.uuid5(_NAMESPACE, f"{kind}:{subject_event_id}"))


class Alert(msgspec.Struct, kw_only=True, frozen=True):
    """One warning. ``subject`` is the item (or collection) it is about."""

    alert_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    kind: str
    severity: str
    subject: str
    collection: str
    evidence: dict[str, Any]
    model_versions: dict[str, str] = {}
    synthetic: bool = False
