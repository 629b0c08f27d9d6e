"""One redactor for everything qops prints, logs, tags or writes: URIs lose ``user:password@``, query-string
secrets (``token``, ``password``, ``secret``, ``key``, signatures, AWS presigned credentials) are masked, and the
values of the credential environment variables (``MLFLOW_TRACKING_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...) are
masked wherever they appear.

:func:`install` puts a :class:`RedactingFilter` on the handlers of the root logger, so records of every library
(MLflow, boto3, Airflow's task log) pass through it; :func:`split_credentials` takes basic-auth credentials out of
a tracking URI so that MLflow never holds them in a URI at all (it reads ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` instead).
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# environment variables whose values are secrets wherever they show up
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AIRFLOW_API_TOKEN",
              "AIRFLOW_API_PASSWORD", "QOPS_WEBHOOK_SECRET", "MLFLOW_WEBHOOK_SECRET",
              "AIRFLOW__API_AUTH__JWT_SECRET")
# query-string (and key=value) names whose values are secrets: token, password, secret, key, signature, ...
_SECRET_NAME = r"[A-Za-z0-9_.-]*(?:token|passw(?:or)?d|pwd|secret|key|signature|sig|credential|auth)[A-Za-z0-9_.-]*"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]*)@")
_QUERY_SECRET = re.compile(rf"(?P<name>[?&;]{_SECRET_NAME}=)(?P<value>[^&#\s'\"]*)", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<name>\b(?:Authorization|X-MLflow-Signature)\s*[:=]\s*(?:Basic|Bearer|v1,)?\s*)"
                          r"(?P<value>[A-Za-z0-9+/=._~-]{6,})", re.IGNORECASE)


def _env_secrets() -> list[str]:
    values = [os.environ.get(k) for k in SECRET_ENV]
    return sorted({v for v in values if v and len(v) >= 6}, key=len, reverse=True)


def redact(text) -> str:
    """``text`` with every credential masked (``scheme://***@host``, ``?token=***``, secret env values)."""
    if text is None:
        return ""
    s = str(text)
    s = _USERINFO.sub(lambda m: m.group("scheme") + (MASK + "@" if m.group("userinfo") else "@"), s)
    s = _QUERY_SECRET.sub(lambda m: m.group("name") + MASK, s)
    s = _AUTH_HEADER.sub(lambda m: m.group("name") + MASK, s)
    for v in _env_secrets():
        s = s.replace(v, MASK)
    return s


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pass@host/path`` -> (``http://host/path``, user, password); other URIs unchanged."""
    if not uri or "://" not in uri or uri.startswith(("sqlite:", "file:")):
        return uri, None, None
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    from urllib.parse import unquote

    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), user, password


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments merged) through :func:`redact`; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, redact(text)
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install(logger: logging.Logger | None = None) -> None:
    """Put the redacting filter on every handler of ``logger`` (default: the root logger), once each. Handlers
    added later (Airflow's task handler) are covered by calling it again at task start."""
    lg = logger or logging.getLogger()
    for h in lg.handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)
    if _FILTER not in lg.filters:
        lg.addFilter(_FILTER)
