"""Registry promotions as Airflow asset events, without Airflow imports (the core of ``qops_airflow.triggers``
and of ``qops webhook``).

Two paths announce that an alias (e.g. ``champion``) of a watched model moved to another version:

* the poller, ``qops_airflow.triggers.MlflowAliasTrigger`` (an ``AssetWatcher`` in the triggerer), which reads the
  alias every ``poll_interval_s``;
* the fast path, :class:`WebhookReceiver` (``qops webhook``, served over HTTP by :mod:`qops.alias_webhook`):
  MLflow (>= 3.3) posts ``model_version_alias.created`` to it, HMAC-signed; it verifies the signature and the
  timestamp, and posts an asset event for ``mlflow://NAME/ALIAS`` to Airflow's REST API v2
  (``POST /api/v2/assets/events``).

Both share one watermark, the registered-model tag ``qops.watch.<alias>`` (the version last announced): whichever
path sees a move first announces it and records it; the other then finds the watermark equal to the holder and
stays quiet. The watermark is written after the event reached Airflow (at least once: a crash in between
announces the move again; qops runs are idempotent per run).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict

log = logging.getLogger(__name__)

WATERMARK_TAG = "qops.watch.{alias}"
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"


def asset_uri(model_name: str, alias: str) -> str:
    """The Asset a watched alias announces its moves on (the DAG factory schedules on the same URI)."""
    return f"mlflow://{model_name}/{alias}"


def event_payload(model_name: str, alias: str, version: str, previous: str | None, via: str) -> dict:
    """What a DAG run triggered by a move receives (the asset event's ``extra``)."""
    return {"model_name": model_name, "alias": alias, "version": str(version), "previous": previous,
            "model_uri": f"models:/{model_name}/{version}", "via": via}


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()


def poll_alias(model_name: str, alias: str, tracking_uri: str | None = None) -> tuple[str | None, str | None]:
    """(version now holding ``alias`` or None, the watermark version or None), from the registry."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        holder = str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        holder = None
    return holder, watermark(model_name, alias, tracking_uri)


def watermark(model_name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_registered_model(model_name).tags.get(WATERMARK_TAG.format(alias=alias))
    except MlflowException:
        return None


def set_watermark(model_name: str, alias: str, version: str, tracking_uri: str | None = None) -> None:
    _client(tracking_uri).set_registered_model_tag(model_name, WATERMARK_TAG.format(alias=alias), str(version))


# ---- the webhook fast path ------------------------------------------------------------------------------------
class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature: ``v1,`` + base64(HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}"))."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers, body: bytes, *, tolerance_s: float = 300, now: float | None = None) -> str:
    """Check an MLflow webhook delivery's HMAC signature and timestamp; returns its delivery id.
    Raises :class:`Rejected` (401) for a missing or wrong signature or a timestamp outside ``tolerance_s``."""
    sig, ts, delivery = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER), headers.get(DELIVERY_HEADER)
    if not (sig and ts and delivery):
        raise Rejected(401, f"unsigned delivery: {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} and {DELIVERY_HEADER} are "
                       "required (create the MLflow webhook with a secret)")
    try:
        age = abs((time.time() if now is None else now) - int(ts))
    except ValueError:
        raise Rejected(401, f"{TIMESTAMP_HEADER} {ts!r} is not a Unix time") from None
    if age > tolerance_s:
        raise Rejected(401, f"stale delivery: its timestamp is {age:.0f} s away from now (limit {tolerance_s:.0f} s)")
    if not hmac.compare_digest(sign(secret, delivery, ts, body).encode(), sig.encode()):
        raise Rejected(401, "bad signature: the webhook's secret differs from QOPS_WEBHOOK_SECRET")
    return delivery


class AirflowClient:
    """Posts asset events through Airflow's REST API v2. Token: ``token``, else ``username``/``password``
    (``POST /auth/token``), else the simple auth manager's all-admins ``GET /auth/token`` (development stacks)."""

    def __init__(self, url: str, token: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.url, self._static, self.username, self.password = url.rstrip("/"), token, username, password
        self._token: str | None = token
        self._asset_ids: dict[str, int] = {}

    def _fetch_token(self) -> str:
        if self._static:
            return self._static
        try:
            if self.username:
                body = json.dumps({"username": self.username, "password": self.password or ""}).encode()
                return self._request("POST", "/auth/token", body, auth=False)["access_token"]
            return self._request("GET", "/auth/token", auth=False)["access_token"]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 405):
                how = f"as {self.username!r}" if self.username else "without credentials (all-admins mode is off)"
                raise Rejected(502, f"Airflow at {self.url} refused a token {how} (HTTP {e.code}): set "
                               "AIRFLOW_API_TOKEN, or AIRFLOW_API_USERNAME and AIRFLOW_API_PASSWORD of a user "
                               "allowed to create asset events") from None
            raise

    def _request(self, method: str, path: str, body: bytes | None = None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            if self._token is None:
                self._token = self._fetch_token()
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 401 and auth and not self._static:  # expired token: fetch a new one, once
                self._token = None
                self._token = self._fetch_token()
                headers["Authorization"] = f"Bearer {self._token}"
                req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or b"null")
            raise

    def asset_id(self, uri: str) -> int | None:
        if uri not in self._asset_ids:
            q = urllib.parse.urlencode({"uri_pattern": uri, "limit": 100})
            for a in self._request("GET", f"/api/v2/assets?{q}")["assets"]:
                if a["uri"] == uri:
                    self._asset_ids[uri] = int(a["id"])
        return self._asset_ids.get(uri)

    def post_event(self, uri: str, extra: dict) -> dict:
        asset = self.asset_id(uri)
        if asset is None:
            raise Rejected(404, f"Airflow has no asset {uri}: deploy a DAG whose spec watches it (spec `watch:`)")
        return self._request("POST", "/api/v2/assets/events",
                             json.dumps({"asset_id": asset, "extra": extra}).encode())


class WebhookReceiver:
    """Turns verified ``model_version_alias.created`` deliveries for watched (model, alias) pairs into asset
    events. :meth:`handle` returns (HTTP status, JSON body); 5xx makes MLflow retry the delivery."""

    def __init__(self, secret: str, airflow: AirflowClient, watch: set[tuple[str, str]],
                 tracking_uri: str | None = None, tolerance_s: float = 300) -> None:
        if not secret:
            raise ValueError("the webhook secret is empty: set QOPS_WEBHOOK_SECRET to the secret the MLflow "
                             "webhook was created with")
        self.secret, self.airflow, self.watch = secret, airflow, set(watch)
        self.tracking_uri, self.tolerance_s = tracking_uri, tolerance_s
        self._seen: OrderedDict[str, None] = OrderedDict()  # delivery ids already handled (MLflow retries)
        self._lock = threading.Lock()

    def handle(self, headers, body: bytes) -> tuple[int, dict]:
        try:
            delivery = verify(self.secret, headers, body, tolerance_s=self.tolerance_s)
            try:
                msg = json.loads(body)
            except ValueError:
                raise Rejected(400, "the body is not JSON") from None
            if (msg.get("entity"), msg.get("action")) != ("model_version_alias", "created"):
                return 202, {"status": "ignored", "reason": f"event {msg.get('entity')}.{msg.get('action')}"}
            data = msg.get("data") or {}
            name, alias, version = data.get("name"), data.get("alias"), data.get("version")
            if not (name and alias and version):
                raise Rejected(400, "a model_version_alias.created payload needs name, alias and version")
            if (name, alias) not in self.watch:
                return 202, {"status": "ignored", "reason": f"{name}@{alias} is not watched"}
            with self._lock:  # one delivery at a time: the watermark check and write must not interleave
                if delivery in self._seen:
                    return 200, {"status": "duplicate", "delivery": delivery}
                previous = watermark(name, alias, self.tracking_uri)
                if previous == str(version):  # the poller (or an earlier delivery) announced this move
                    return 200, {"status": "already announced", "version": str(version)}
                extra = event_payload(name, alias, version, previous, via="webhook")
                try:
                    event = self.airflow.post_event(asset_uri(name, alias), extra)
                except Rejected:
                    raise
                except Exception as e:  # noqa: BLE001 - Airflow unreachable or failing: MLflow retries the delivery
                    raise Rejected(502, f"posting the asset event to Airflow failed: {e}") from None
                set_watermark(name, alias, str(version), self.tracking_uri)
                self._seen[delivery] = None
                while len(self._seen) > 1000:
                    self._seen.popitem(last=False)
            log.info("%s@%s moved from %s to %s: asset event %s", name, alias, previous, version, event.get("id"))
            return 200, {"status": "announced", "asset_event": event.get("id"), **extra}
        except Rejected as e:
            log.warning("webhook delivery rejected (%d): %s", e.status, e.reason)
            return e.status, {"error": e.reason}


def receiver_from_env(airflow_url: str, watch: list[str], tracking_uri: str | None = None) -> WebhookReceiver:
    """Secrets come from the environment, never the command line: ``QOPS_WEBHOOK_SECRET``, and
    ``AIRFLOW_API_TOKEN`` or ``AIRFLOW_API_USERNAME``/``AIRFLOW_API_PASSWORD``."""
    pairs = set()
    for w in watch:
        name, sep, alias = w.partition("@")
        if not (sep and name and alias):
            raise ValueError(f"--watch {w!r}: give NAME@ALIAS, e.g. german-credit@champion")
        pairs.add((name, alias))
    client = AirflowClient(airflow_url, os.environ.get("AIRFLOW_API_TOKEN"), os.environ.get("AIRFLOW_API_USERNAME"),
                           os.environ.get("AIRFLOW_API_PASSWORD"))
    return WebhookReceiver(os.environ.get("QOPS_WEBHOOK_SECRET", ""), client, pairs, tracking_uri)
