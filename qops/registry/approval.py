"""A person's answer to a promotion approval request, recorded on the model version it is about: ``qops.approval``
(``approved`` or ``rejected``), ``qops.approval.by``, ``qops.approval.reason``, ``qops.approval.at`` and
``qops.approval.alias`` (docs/registry.md#human-approval)."""

from __future__ import annotations

from datetime import datetime, timezone

from qops.errors import RegistryError
from qops.redact import redact
from qops.registry.client import reachable


def approval_tags(approved: bool, alias: str, by: str | None, reason: str | None, at: str | None = None) -> dict:
    """The tags that record the answer (``by`` and ``reason`` as given; empty when the answer had none)."""
    return {"qops.approval": "approved" if approved else "rejected", "qops.approval.alias": alias,
            "qops.approval.by": by or "", "qops.approval.reason": (reason or "").strip(),
            "qops.approval.at": at or datetime.now(timezone.utc).isoformat(timespec="seconds")}


def record_approval(name: str, version: str, alias: str, *, approved: bool, by: str | None = None,
                    reason: str | None = None) -> dict:
    """Tag ``name`` version ``version`` with the answer to the request to move ``alias`` to it; returns the tags.
    The alias itself is not touched here: an approval lets the promote stage move it, a rejection leaves it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    reachable(client)
    tags = approval_tags(approved, alias, by, reason)
    try:
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)
    except MlflowException as e:
        raise RegistryError(f"Recording the approval of {name} version {version} failed: "
                            f"{redact(str(e).splitlines()[0][:300])}",
                            "check the tracking URI and that the version still exists.") from None
    return tags
