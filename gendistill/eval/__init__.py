"""Evaluation: domain classifiers, FID, FAD, conditional accuracy, exact 2-D metrics, and
``evaluate_pipeline`` (what ``gendistill evaluate`` runs). Heavy modules load on first use."""
from __future__ import annotations

from .frechet import frechet_distance, frechet_distance_of_features, gaussian_stats
from .metrics2d import mmd_rbf, score_2d, sliced_wasserstein

_LAZY = {
    "DomainClassifier": "classifier", "load_classifier": "classifier",
    "train_classifier": "classifier", "ClassifierFeatures": "classifier",
    "domain_fid": "fid", "inception_fid": "fid", "to_inception_input": "fid",
    "domain_fad": "fad", "fad": "fad", "fad_from_embeddings": "fad",
    "load_audio_embedding": "fad", "VGGish": "fad", "load_vggish": "fad",
    "VGGishEmbedding": "fad", "ClapEmbedding": "fad", "DomainEmbedding": "fad",
    "conditional_accuracy": "accuracy", "caption_families": "accuracy",
    "evaluate_pipeline": "evaluate", "generate_for_conditions": "evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["frechet_distance", "frechet_distance_of_features", "gaussian_stats", "mmd_rbf",
           "score_2d", "sliced_wasserstein", *_LAZY]
