"""Tasks on the decoder's queries: validity, hit assignment and track-parameter regression."""

from muonreg.tasks.hit_mask import ObjectHitMaskTask
from muonreg.tasks.regression import ObjectRegressionTask
from muonreg.tasks.valid import ObjectValidTask
from muonreg.tasks.weighted_pooling import WeightedPoolingObjectHitRegressionTask

__all__ = [
    "ObjectHitMaskTask",
    "ObjectRegressionTask",
    "ObjectValidTask",
    "WeightedPoolingObjectHitRegressionTask",
]
