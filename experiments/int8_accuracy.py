"""Float and int8 accuracy of finished training runs, side by side (``addervit eval --int8`` on
each, one table).

    TFDS_DATA_DIR=../shared/datasets/tfds python experiments/int8_accuracy.py \\
        experiments/results/screen_cifar10/runs/* --out experiments/results/int8

Each run is evaluated on its own evaluation split (``train.evaluate_workdir(int8=True)``:
``models.quantize`` converts every site kind that has an int8 form and names the sites left float;
adder sites are calibrated on the run's first training batches without augmentation). Writes
``accuracy.json`` (one record per run) and ``accuracy.md`` under ``--out``. The difference of a
pair is measured on the same images, so its noise is that of the images whose prediction changed,
not the standard error of either accuracy.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from addervit_jax import cli, reports, train


def evaluate(
    runs: dict[pathlib.Path, dict], calibration_batches: int
) -> tuple[list[dict], dict[str, str]]:
    """One record per run (``{workdir: its summary}``): its variant and ``evaluate_workdir``'s
    float and int8 results; and ``{workdir: why}`` for the runs that could not be evaluated
    (e.g. more calibration batches than their epoch holds), the others evaluated all the same
    (and printed: ``main`` then writes nothing to ``--out``)."""
    records, failures = [], {}
    for workdir, summary in runs.items():
        try:
            result = train.evaluate_workdir(
                workdir, int8=True, calibration_batches=calibration_batches
            )
        except ValueError as err:
            failures[str(workdir)] = str(err)
            print(f"{workdir}: not evaluated: {err}", flush=True)
            continue
        records.append({"workdir": str(workdir), "variant": summary["variant"], **result})
        print(
            f"{workdir}: float {result['float']['accuracy']:.4f}, int8 "
            f"{result['int8']['accuracy']:.4f}",
            flush=True,
        )
    return records, failures


def _name(workdir: str) -> str:
    """A run's folder, with its study's when it lies in ``STUDY/runs/`` (two studies may each
    have a ``multi_seed0``)."""
    path = pathlib.Path(workdir)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "runs" else path.name


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| run | variant | split | float acc (%) | int8 acc (%) | int8 - float (points) "
        "| sites on integers | left float |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in records:
        f, q = r["float"]["accuracy"], r["int8"]["accuracy"]
        sites = ", ".join(f"{n} {kind}" for kind, n in r["int8_sites"].items())
        kinds = sorted({site.rsplit("(", 1)[-1].rstrip(")") for site in r["float_sites"]})
        lines.append(
            f"| {_name(r['workdir'])} | {r['variant']} | {r['split']} | "
            f"{100 * f:.2f} | {100 * q:.2f} | {100 * (q - f):+.2f} | {sites} | "
            f"{', '.join(kinds) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="work directories of finished training runs")
    parser.add_argument("--calibration-batches", type=cli.int_at_least(1), default=4)
    parser.add_argument("--out", default=None, help="directory for accuracy.json and accuracy.md")
    args = parser.parse_args(argv)
    problem = reports.unwritable(args.out) if args.out is not None else None
    if problem:  # before the evaluations, not after them
        parser.error(f"--out {args.out}: {problem}")
    runs = {}
    for workdir in map(pathlib.Path, args.runs):  # every run checked before any is evaluated
        try:
            runs[workdir], _ = train.finished_run("run", workdir, whose="its")
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    records, failures = evaluate(runs, args.calibration_batches)
    command = reports.command_line("int8_accuracy.py", argv)
    table = "\n".join(
        [
            "# Float and int8 accuracy of trained runs",
            "",
            *reports.header_lines(command),
            "- int8: `models.quantize` (`addervit eval --int8`); kinds left float: the sites that "
            "have no int8 form (attention scores and values, euclid sites)",
            "",
            markdown_table(records),
            "",
            *(f"Not evaluated: {_name(w)}: {why}" for w, why in failures.items()),
        ]
    )
    print(table)
    if failures:  # the table above keeps what was measured; --out's files are not cut short
        raise SystemExit(
            f"int8_accuracy.py: {len(failures)} of {len(runs)} runs not evaluated; nothing "
            "written to --out (the table above holds the others)"
        )
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.json").write_text(json.dumps(records, indent=2) + "\n")
        (out / "accuracy.md").write_text(table)


if __name__ == "__main__":
    main()
