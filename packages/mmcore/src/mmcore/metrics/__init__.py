"""Metrics: cumulative objects (call per batch, ``aggregate()``, ``reset()``) and pure twins."""

from mmcore.metrics.base import CumulativeMetric, all_gather_cat
from mmcore.metrics.classification import (
    IEMOCAP_EMOTIONS,
    ClassificationMetric,
    IEMOCAPMetric,
    classification_metrics,
    iemocap_metrics,
)
from mmcore.metrics.multilabel import MultiLabelMetric, multilabel_metrics
from mmcore.metrics.regression import (
    MSAMetric,
    SIMSMetric,
    msa_regression_metrics,
    sims_regression_metrics,
)
from mmcore.metrics.segmentation import (
    BRATS_REGIONS,
    BratsDiceMetric,
    brats_dice,
    brats_region_masks,
)

__all__ = [
    "BRATS_REGIONS",
    "IEMOCAP_EMOTIONS",
    "BratsDiceMetric",
    "ClassificationMetric",
    "CumulativeMetric",
    "IEMOCAPMetric",
    "MSAMetric",
    "MultiLabelMetric",
    "SIMSMetric",
    "all_gather_cat",
    "brats_dice",
    "brats_region_masks",
    "classification_metrics",
    "iemocap_metrics",
    "msa_regression_metrics",
    "multilabel_metrics",
    "sims_regression_metrics",
]
