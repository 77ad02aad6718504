"""Activation statistics for calibrated rounding: what each Linear layer's input looks like.

One module per job: `statistics` (the types), `recorder` (forward hooks that record them),
`statistics_file` (saving, and lazy loading one input at a time), `matching` (which recorded layer
belongs to which weight of a file). The names below are the public ones:

    with StatisticsRecorder(model) as recorder:
        for batch in batches:
            model(batch)
    save_statistics(recorder.statistics(model="my-model"), "stats.safetensors")
    statistics = load_statistics("stats.safetensors")   # what `--calib` does
"""

from .matching import match_weight_keys, statistics_for_weights
from .recorder import DEFAULT_MAX_FULL_DIM, DEFAULT_SUMMARY_RANK, StatisticsRecorder
from .statistics import CalibrationStatistics, FoldedInputs, InputStatistics, merge_statistics
from .statistics_file import load_statistics, save_statistics

__all__ = [
    "DEFAULT_MAX_FULL_DIM",
    "DEFAULT_SUMMARY_RANK",
    "CalibrationStatistics",
    "FoldedInputs",
    "InputStatistics",
    "StatisticsRecorder",
    "load_statistics",
    "match_weight_keys",
    "merge_statistics",
    "save_statistics",
    "statistics_for_weights",
]
