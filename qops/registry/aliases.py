"""Aliases: settle ``candidate``/``champion`` on the newest passing version, and promote a serving alias by policy
(gates passed, approval, not worse than the holder on the policy's metrics)."""

from __future__ import annotations

import logging

from qops.errors import PromotionRefused, RegistryError
from qops.redact import redact
from qops.registry.client import reachable

log = logging.getLogger(__name__)


def _newest_first(mv) -> tuple[int, int]:
    """Order of qops versions for the aliases registration moves: the newest source version, then the latest
    registration of it (a source given as a file has no version: it ranks below registered sources)."""
    src = (mv.tags or {}).get("qops.source_version") or ""
    return (int(src) if src.isdigit() else -1, int(mv.version))


def set_alias(client, name: str, alias: str, version: str) -> bool:
    """Set ``alias``; False when a concurrent writer created the same alias in the same instant (MLflow's SQL store
    selects, then inserts: two first-time writers collide on the alias's unique key). The caller reads back and
    retries; any other failure is raised."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, alias, version)
        return True
    except MlflowException as e:
        text = str(e)
        if "UNIQUE constraint" not in text and "IntegrityError" not in text and "duplicate key" not in text:
            raise
        log.info("alias %s of %s was created concurrently by another registration: reading it back", alias, name)
        return False


def settle_aliases(client, name: str, aliases: list[str], rounds: int = 10) -> dict[str, str]:
    """Point each of ``aliases`` at the newest complete, gate-passed qops version of ``name`` (by
    :func:`_newest_first`); returns {alias: version}. Lock-free and safe under concurrent registrations: each writer
    sets what it computed, then reads back and repeats until what it reads is what it would set, and since the
    newest version only ever gets newer, the last writer's confirmation leaves every alias on the newest one —
    two DAG runs registering at once never leave ``candidate`` and ``champion`` on versions out of order."""
    held: dict[str, str] = {}
    for _ in range(rounds):
        ready = [mv for mv in client.search_model_versions(f"name = '{name}'")
                 if (mv.tags or {}).get("qops.complete") == "true" and (mv.tags or {}).get("qops.gate") == "passed"]
        if not ready:
            return {}
        best = str(max(ready, key=_newest_first).version)
        current = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        if all(current.get(a) == best for a in aliases):
            return {a: best for a in aliases}
        for a in aliases:
            if current.get(a) != best:
                set_alias(client, name, a, best)
        held = {a: best for a in aliases}
    log.warning("aliases %s of %s still moving after %d rounds (registrations racing); left on %s", aliases, name,
                rounds, held)
    return held


def promote(name: str, version: str, alias: str = "champion", *, approved: bool = False,
            require_approval: bool = False, better_on: dict[str, str] | None = None, by: str | None = None) -> dict:
    """Point ``alias`` at ``version`` when the policy allows it; the version it replaces is tagged with when and
    by whom (``by``: e.g. the DAG run).

    Policy: the version's gates passed (always); ``require_approval``: only with ``approved``; ``better_on``
    (metric -> ``max`` or ``min``): the version's logged metrics must be at least as good as the current
    holder's on each. Promoting the version that already holds the alias changes nothing (retries are safe).
    Returns ``promoted`` (bool), ``previous`` (the replaced version or None) and ``reason``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    reachable(client)  # a server that is down: a clear error in seconds, with no credential in it
    try:
        return _promote(client, name, version, alias, approved, require_approval, better_on, by)
    except MlflowException as e:
        raise RegistryError(f"Promoting {name} version {version} to @{alias} failed: "
                            f"{redact(str(e).splitlines()[0][:300])}",
                            "check the model name and version (qops register prints them) and the tracking URI.") from None


def _promote(client, name, version, alias, approved, require_approval, better_on, by) -> dict:
    from datetime import datetime, timezone

    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(name, version)
    if mv.tags.get("qops.gate") != "passed":
        raise PromotionRefused(f"{name} version {version} did not pass its gates (qops.gate={mv.tags.get('qops.gate')}).",
                            "promote a version whose gates passed.")
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    out = {"name": name, "version": str(version), "alias": alias,
           "previous": None if current is None else str(current.version)}
    if current is not None and str(current.version) == str(version):
        return {**out, "promoted": False, "reason": f"version {version} already holds @{alias}"}
    if require_approval and not approved:
        raise PromotionRefused(f"Promoting {name} version {version} to @{alias} needs a manual approval.",
                            "approve it: qops promote --approve, or trigger the DAG with conf "
                            '{"approve_promotion": true}.')
    if better_on and current is not None:
        mine, theirs = client.get_run(mv.run_id).data.metrics, client.get_run(current.run_id).data.metrics
        worse = []
        for metric, direction in better_on.items():
            if direction not in ("max", "min"):
                raise RegistryError(f"Promotion metric {metric!r} has direction {direction!r}.", "use max or min.")
            if metric not in mine or metric not in theirs:
                raise RegistryError(f"Metric {metric!r} is not logged for version {version} and the holder of "
                                    f"@{alias} (version {current.version}).",
                                    f"compare on logged metrics (version {version} has {sorted(mine)}).")
            ok = mine[metric] >= theirs[metric] if direction == "max" else mine[metric] <= theirs[metric]
            if not ok:
                worse.append(f"{metric} {mine[metric]:.6g} vs {theirs[metric]:.6g} ({direction})")
        if worse:
            raise PromotionRefused(f"{name} version {version} is not better than version {current.version}, which "
                                f"holds @{alias}: {'; '.join(worse)}.",
                                "keep the current holder, or relax mlflow.promotion.better_on.")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"qops.promoted.{alias}", f"{now} by {by or 'qops promote'}")
    if current is not None:
        client.set_model_version_tag(name, current.version, f"qops.replaced.{alias}",
                                     f"{now} by version {version} ({by or 'qops promote'})")
    return {**out, "promoted": True, "reason": f"@{alias} moved from version {out['previous']} to {version}"
            if current is not None else f"@{alias} set to version {version}"}
