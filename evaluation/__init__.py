"""Evaluation library: verification, quality assessment (ERC/EDC), set/video aggregation, plots.

Pure numpy / torch / matplotlib; models enter only as arrays or callables.
"""

from evaluation.aggregation import (
    OnlineAggregator,
    StreamDecision,
    aggregate,
    compare_online_vs_window,
    evaluate_set_pairs,
    match_stream,
)
from evaluation.baselines import (
    dropout_only_train_mode,
    feature_norm_quality,
    laplacian_variance,
    random_quality,
    serfiq_quality,
    stochastic_embed_fn_from_module,
)
from evaluation.quality_assessment import (
    ERCResult,
    error_versus_discard,
    format_quality_table,
    pair_quality,
    quality_correlation,
    quality_report,
    yaleb_light_angle,
)
from evaluation.verification import flip_sum_embeddings, make_pairs, verify, verify_scores

__all__ = [
    "ERCResult",
    "OnlineAggregator",
    "StreamDecision",
    "aggregate",
    "compare_online_vs_window",
    "dropout_only_train_mode",
    "error_versus_discard",
    "evaluate_set_pairs",
    "feature_norm_quality",
    "flip_sum_embeddings",
    "format_quality_table",
    "laplacian_variance",
    "make_pairs",
    "match_stream",
    "pair_quality",
    "quality_correlation",
    "quality_report",
    "random_quality",
    "serfiq_quality",
    "stochastic_embed_fn_from_module",
    "verify",
    "verify_scores",
    "yaleb_light_angle",
]
