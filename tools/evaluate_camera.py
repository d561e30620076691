#!/usr/bin/env python
"""Score camera predictions against ground truth the way the published Puffin evaluation does.

    python tools/evaluate_camera.py --predictions predictions.json --ground-truth cameras.csv --output-dir eval/

--predictions: a JSON list of {"id": image name, "output_text": model text} (what tools/understand.py writes).
--ground-truth: cameras.csv with fname, roll, pitch, vfov, width, height (radians, original image size).
Writes DIR/metrics.json (mean_/median_<p>_error in degrees and auc_<p>_error@1/@5/@10 as fractions, for p = roll,
pitch, vfov; plus num_images and num_fallback), DIR/errors.csv (one row per image) and DIR/errors.png (error
distributions), and prints the table. See docs/evaluation.md.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "evaluate_camera.py")  # Ctrl-C while the libraries below load: one line

from megatron_puffin.evaluation import (  # noqa: E402
    EvaluationInputError,
    evaluate_predictions,
    format_table,
    read_ground_truth,
    read_predictions,
    write_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, type=Path,
                        help='JSON list of {"id": ..., "output_text": ...} (tools/understand.py output).')
    parser.add_argument("--ground-truth", required=True, type=Path,
                        help="cameras.csv: fname, roll, pitch, vfov, width, height (radians).")
    parser.add_argument("--output-dir", required=True, type=Path,
                        help="Folder for metrics.json, errors.csv and errors.png (created).")
    parser.add_argument("--title", default=None, help="Title of the table and the plot (default: the predictions file).")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        predictions = read_predictions(args.predictions)
        ground_truth = read_ground_truth(args.ground_truth)
        metrics, scored = evaluate_predictions(predictions, ground_truth)
        if args.output_dir.exists() and not args.output_dir.is_dir():
            raise EvaluationInputError(f"--output-dir {args.output_dir} exists and is not a folder")
    except EvaluationInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    title = args.title or str(args.predictions)
    try:
        paths = write_report(metrics, scored, args.output_dir, title)
    except OSError as error:
        print(f"error: --output-dir {args.output_dir}: cannot write the report ({error})", file=sys.stderr)
        return 2
    print(format_table(metrics, title))
    if len(scored) < len(ground_truth):  # e.g. understand.py --skip-bad-images, or a partial prediction run
        print(f"note: {len(ground_truth) - len(scored)} of the {len(ground_truth)} images of --ground-truth have no "
              "prediction and are not scored: the numbers above are not comparable with a full run's",
              file=sys.stderr)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("evaluate_camera.py", main,
                            "the files in --output-dir may be incomplete: run the same command again"))
