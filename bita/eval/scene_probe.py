"""Linear-probe scene accuracy of a tower's features: a diagnostic of how much of the scene
class the features carry, for comparing towers (frozen, adapted, another encoder, finer
tokens) on the same images. Never a training signal: the captions are the only supervision the
project trains on, and the classes here come from the records' `scene` field (file names).

The probe is scikit-learn's logistic regression on standardised mean-pooled tokens, fitted on
the train split and scored on the query images whose class occurs in train.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bita.eval.baselines import SplitFeatures

PROBE_STRENGTHS = (0.1, 1.0)  # inverse L2 strengths C the probe is fitted with, each reported


def scene_probe_accuracy(
    train: SplitFeatures, query: SplitFeatures, strengths: Sequence[float] = PROBE_STRENGTHS
) -> dict:
    """{"images": query images scored, "accuracy": {C: fraction correct}} of a logistic
    regression from train features to train scenes, on the query images of known classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if any(scene is None for scene in train.scenes):
        raise ValueError("scene probe: training records without a scene class")
    train_classes = set(train.scenes)
    known = [i for i, scene in enumerate(query.scenes) if scene in train_classes]
    if not known:
        raise ValueError("scene probe: no query image has a scene class seen in train")
    x_train, y_train = train.features.numpy(), np.asarray(train.scenes)
    x_query, y_query = query.features[known].numpy(), np.asarray(query.scenes)[known]
    accuracy = {}
    for strength in strengths:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=2000))
        probe.fit(x_train, y_train)
        accuracy[float(strength)] = float((probe.predict(x_query) == y_query).mean())
    return {"images": len(known), "accuracy": accuracy}
