"""Event-driven scheduling on MLflow registry promotions: an ``AssetWatcher`` trigger that fires when an alias
(e.g. ``champion``) of a registered model moves to another version — set by anyone, in the MLflow UI or API.

The trigger polls the registry (one ``get_model_version_by_alias`` call per interval) and keeps its watermark,
the version it last fired for, in the registry itself: a registered-model tag ``qops.watch.<alias>``. A
restarted triggerer therefore neither fires twice for one move nor misses a move made while it was down, and
the webhook fast path (``qops webhook``, :mod:`qops.alias_events`) shares it: a move it announced first is not
announced again here. The tag is written after the event is handed to Airflow (at-least-once: a crash in
between fires the move again, and qops' runs are idempotent per run). The first start finds no watermark and
records the current holder without firing (``fire_on_start=True`` fires for it).

Each event's payload carries ``model_name``, ``alias``, ``version``, ``previous``, ``model_uri``
(``models:/NAME/VERSION``) and ``via`` (``poller``); Airflow stores it as the asset event's ``extra``, and the
quantization DAG's source task resolves exactly that version (not whatever the alias points at when the task starts).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from qops.alias_events import event_payload, poll_alias, set_watermark

log = logging.getLogger(__name__)


class MlflowAliasTrigger(BaseEventTrigger):
    """Fires a :class:`TriggerEvent` each time ``alias`` of ``model_name`` points at a new version."""

    def __init__(self, model_name: str, alias: str = "champion", tracking_uri: str | None = None,
                 poll_interval: float = 30.0, fire_on_start: bool = False) -> None:
        super().__init__()
        self.model_name, self.alias, self.tracking_uri = model_name, alias, tracking_uri
        self.poll_interval, self.fire_on_start = float(poll_interval), bool(fire_on_start)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("qops_airflow.triggers.MlflowAliasTrigger",
                {"model_name": self.model_name, "alias": self.alias, "tracking_uri": self.tracking_uri,
                 "poll_interval": self.poll_interval, "fire_on_start": self.fire_on_start})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                holder, seen = await asyncio.to_thread(poll_alias, self.model_name, self.alias, self.tracking_uri)
            except Exception as e:  # noqa: BLE001 - a registry outage must not kill the watcher: retry next poll
                log.warning("polling %s@%s failed (%s); retrying in %.0f s", self.model_name, self.alias, e,
                            self.poll_interval)
                holder, seen = None, None
            if holder is not None and holder != seen:
                if seen is None and not self.fire_on_start:
                    log.info("watching %s@%s from version %s", self.model_name, self.alias, holder)
                else:
                    log.info("%s@%s moved from version %s to %s", self.model_name, self.alias, seen, holder)
                    yield TriggerEvent(event_payload(self.model_name, self.alias, holder, seen, via="poller"))
                await asyncio.to_thread(set_watermark, self.model_name, self.alias, holder, self.tracking_uri)
            await asyncio.sleep(self.poll_interval)


def source_from_events(context, model_name: str) -> str | None:
    """The ``models:/NAME/VERSION`` a DAG run was triggered for (the latest event of the alias watcher for
    ``model_name`` among the run's triggering asset events), or None."""
    found = None
    events = context.get("triggering_asset_events") or {}
    for evs in events.values():
        for ev in evs:
            extra = getattr(ev, "extra", None) or {}
            payload = extra.get("payload", extra) if isinstance(extra, dict) else {}
            if isinstance(payload, dict) and payload.get("model_name") == model_name and payload.get("model_uri"):
                found = payload["model_uri"]
    return found
