"""Metrics: FID / IS / KID with the FID Inception network, a digits classifier for the
8x8 quick-start data, and distances and score errors for 2-D toy distributions."""
from ncsn.metrics.digits import (DigitsClassifier, digits_metrics, heldout_accuracy,
                                 load_digits_classifier, train_digits_classifier)
from ncsn.metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from ncsn.metrics.inception import (FIDInceptionV3, InceptionWeightsNotFound,
                                    default_weights_path, fid_inception_v3)
from ncsn.metrics.scores import ExtractedFeatures, extract_features, inception_score, kid
from ncsn.metrics.toy import energy_distance, score_error, sliced_wasserstein

__all__ = [
    "DigitsClassifier", "ExtractedFeatures", "FIDInceptionV3", "FeatureStats",
    "InceptionWeightsNotFound", "default_weights_path", "digits_metrics", "energy_distance",
    "extract_features", "fid_inception_v3", "frechet_distance", "heldout_accuracy",
    "inception_score", "kid", "load_digits_classifier", "load_stats", "save_stats",
    "score_error", "sliced_wasserstein", "train_digits_classifier",
]
