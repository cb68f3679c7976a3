"""Statistics that data-driven merges read besides the weights: Gram matrices (RegMean), Fisher (Fisher merging).

Collect them from a model and some inputs (:func:`collect_gram`, :func:`collect_fisher`, or ``transfuse
statistics`` for a Hugging Face model dir), save one file per model (:meth:`ModelStatistics.save`), and name
each file in the recipe (``models[].statistics``); the merge reads them tensor by tensor (:class:`StatisticsSet`).
"""

from transfuse.statistics.fisher import LABEL_MODES, collect_fisher
from transfuse.statistics.gram import collect_gram, linear_layers
from transfuse.statistics.store import ModelStatistics, StatisticsError, StatisticsSet, read_header

__all__ = [
    "LABEL_MODES",
    "ModelStatistics",
    "StatisticsError",
    "StatisticsSet",
    "collect_fisher",
    "collect_gram",
    "linear_layers",
    "read_header",
]
