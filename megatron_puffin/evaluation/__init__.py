"""Evaluation of trained Puffin models: camera-understanding metrics as the published Puffin evaluation computes
them (see docs/evaluation.md and :mod:`~megatron_puffin.evaluation.camera_metrics`)."""
from megatron_puffin.evaluation.camera_metrics import (
    AUC_THRESHOLDS,
    MIN_ERROR,
    PARAMETERS,
    EvaluationInputError,
    GroundTruthCamera,
    ImageErrors,
    error_auc,
    evaluate_predictions,
    match_ground_truth,
    read_ground_truth,
    read_predictions,
    restore_portrait_vfov,
    score_prediction,
    summarize,
)
from megatron_puffin.evaluation.report import format_table, plot_errors, write_errors_csv, write_metrics, write_report

__all__ = [
    "AUC_THRESHOLDS",
    "MIN_ERROR",
    "PARAMETERS",
    "EvaluationInputError",
    "GroundTruthCamera",
    "ImageErrors",
    "error_auc",
    "evaluate_predictions",
    "format_table",
    "match_ground_truth",
    "plot_errors",
    "read_ground_truth",
    "read_predictions",
    "restore_portrait_vfov",
    "score_prediction",
    "summarize",
    "write_errors_csv",
    "write_metrics",
    "write_report",
]
