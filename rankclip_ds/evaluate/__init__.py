"""Evaluation of dual encoders: zero-shot classification, image–text retrieval, graded relevance and ranking
consistency, and linear probes.

The same functions serve the command line (``python -m rankclip_ds.evaluate``), the trainer's periodic hook and
notebooks. They take plain arguments (a model, a tokenizer, data paths, transform settings) and return JSON-ready
dicts whose accuracies and recalls are fractions in [0, 1]. Under ``torch.distributed`` every rank calls them with
the same arguments, embeds a slice of the data, and gets the same result. See ``docs/evaluation.md``.
"""

from .datasets import EvalData, list_image_folder, open_eval_data, resolve_classnames
from .features import ImageFeatures, encode_texts, extract_image_features
from .linear_probe import DEFAULT_WEIGHT_DECAYS, fit_logistic_regression, linear_probe_eval, linear_probe_from_features
from .metrics import (
    TIE_RULE,
    ClassificationCounts,
    RetrievalRanks,
    best_positive_rank,
    classification_counts,
    classification_metrics,
    hits_at_k,
    rank_of_target,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)
from .relevance import relevance_eval, shared_fact_relevance
from .relevance_metrics import (
    RelevanceRanking,
    alignment,
    average_precision,
    kendall_tau_b,
    modality_gap,
    ndcg_at_k,
    relevance_metrics,
    relevance_ranking,
    spearman,
    uniformity,
)
from .report import append_jsonl, format_summary, log_eval, scalar_summary, write_json
from .retrieval import retrieval_eval
from .templates import OPENAI_IMAGENET_TEMPLATES, fill_template, resolve_templates
from .zeroshot import build_zeroshot_classifier, zeroshot_classifier_from_embeddings, zeroshot_eval

__all__ = [
    "DEFAULT_WEIGHT_DECAYS",
    "OPENAI_IMAGENET_TEMPLATES",
    "TIE_RULE",
    "ClassificationCounts",
    "EvalData",
    "ImageFeatures",
    "RelevanceRanking",
    "RetrievalRanks",
    "alignment",
    "append_jsonl",
    "average_precision",
    "best_positive_rank",
    "build_zeroshot_classifier",
    "classification_counts",
    "classification_metrics",
    "encode_texts",
    "extract_image_features",
    "fill_template",
    "fit_logistic_regression",
    "format_summary",
    "hits_at_k",
    "kendall_tau_b",
    "linear_probe_eval",
    "linear_probe_from_features",
    "list_image_folder",
    "log_eval",
    "modality_gap",
    "ndcg_at_k",
    "open_eval_data",
    "rank_of_target",
    "recall_at_k",
    "relevance_eval",
    "relevance_metrics",
    "relevance_ranking",
    "resolve_classnames",
    "resolve_templates",
    "retrieval_eval",
    "retrieval_metrics",
    "retrieval_ranks",
    "scalar_summary",
    "shared_fact_relevance",
    "spearman",
    "uniformity",
    "write_json",
    "zeroshot_classifier_from_embeddings",
    "zeroshot_eval",
]
