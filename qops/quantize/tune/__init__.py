"""Accuracy-aware tuning: ``space`` (the candidates of a recipe), ``sensitivity`` (which nodes lose the most
signal, for the FP32/INT8 fallback) and ``search`` (:func:`tune`: search, fall back, keep the fastest passing
candidate). The judge is the caller's (the pipeline's: :func:`qops.gates.gate_judge`)."""

from qops.quantize.tune.search import Judge, choose, tune
from qops.quantize.tune.sensitivity import merge_rankings, rank_nodes, stream_sqnr_sums
from qops.quantize.tune.space import search_space

__all__ = ["Judge", "choose", "merge_rankings", "rank_nodes", "search_space", "stream_sqnr_sums", "tune"]
