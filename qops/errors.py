"""Errors that name the problem and the fix."""

from __future__ import annotations


class QopsError(Exception):
    """Base class: a user-facing error. The message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class SpecError(QopsError):
    """The pipeline spec is invalid."""


class DataError(QopsError):
    """Input data is missing, empty, malformed or does not match the model."""


class DriftError(QopsError):
    """The calibration set drifted from the reference."""

    def __init__(self, problem: str, fix: str | None = None, report: dict | None = None):
        super().__init__(problem, fix)
        self.report = report or {}


class TargetError(QopsError):
    """Unknown or unusable hardware target."""


class ModelError(QopsError):
    """The model cannot be loaded, exported or run."""


class GateFailed(QopsError):
    """One or more gates failed. ``result`` holds the full gate result."""

    def __init__(self, problem: str, result: dict):
        super().__init__(problem)
        self.result = result


class RegistryError(QopsError):
    """Registration in MLflow failed; nothing was left half-registered."""


class RegistryUnavailable(RegistryError):
    """The registry or its artifact store failed or could not be reached; nothing was left half-registered, and
    a later retry may succeed (operators let Airflow retry these, unlike bad input)."""


class PromotionRefused(RegistryError):
    """A promotion the policy refused (manual approval missing, not better than the alias holder, gates not passed):
    a decision, not bad input; the CLI exits 4."""
