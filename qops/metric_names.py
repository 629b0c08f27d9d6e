"""The metric names qops computes and their direction: one table, read by the spec's validation, the evaluation
and the gates (``qops quantize --help`` lists them too)."""

from __future__ import annotations

CLASSIFICATION_METRICS = ("accuracy", "f1", "roc_auc")
REGRESSION_METRICS = ("mae", "rmse")
FIDELITY_METRICS = ("agreement", "cosine", "kl")
EMBEDDING_METRICS = ("cosine", "neighbor_agreement")
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "mae": False, "rmse": False,
                    "agreement": True, "cosine": True, "kl": False, "neighbor_agreement": True,
                    "embedding_cosine": True,
                    # decoder LLMs (qops.llm.evaluate)
                    "perplexity": False, "perplexity_increase": False, "kl_divergence": False, "kl_p99": False}
FAIRNESS_METRICS = ("demographic_parity_difference", "equalized_odds_difference", "metric_gap")


def known_metrics(custom: dict | None = None) -> list[str]:
    """Every metric name a gate may name: the built-in ones and the spec's custom metrics."""
    return sorted(set(HIGHER_IS_BETTER) | set(custom or {}))
