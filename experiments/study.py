"""The training studies' runner, shared by ``variants.py``, ``grad_rules.py``, ``screen.py`` and
``study_cifar10.py``. (The header of every result file: :mod:`addervit_jax.reports`.)

A study is a list of runs, each a label (a variant, a gradient rule), a seed and a full training
config built from one recipe. Each run trains in ``OUT/runs/<label>_seed<seed>`` through
``train.train(..., resume="auto")``, which reads a finished run back and resumes an interrupted
one from its checkpoints, so a study stopped half-way loses nothing when the same command is
started again. Results aggregate over seeds (mean and sample standard deviation)
into a Markdown table and a figure of validation curves, both headed with the command and the
hardware that made them (each run records its own in ``summary.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import statistics

import jax
import ml_collections
from flax import nnx

from addervit_jax import cli, configs, counts, logs, models, reports, timing, train

# bench_int8.py's model timings, read (never measured) by the reports: a report is written while
# trainings share the cores, when no timing is honest
INFERENCE = pathlib.Path(__file__).parent / "results" / "int8" / "results.json"


@dataclasses.dataclass
class Run:
    label: str
    seed: int
    config: ml_collections.ConfigDict
    # False: the study only reads this run back where it finished with the same config (--arms,
    # --report-only), never trains it
    may_train: bool = True

    @property
    def name(self) -> str:
        """The run's folder under ``OUT/runs``: the label with runs of other characters as ``_``."""
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.label).strip("_") + f"_seed{self.seed}"


def add_recipe_flags(
    parser: argparse.ArgumentParser,
    *,
    default_config: str,
    default_set: tuple[str, ...] = (),
    default_seeds: tuple[int, ...] = (0,),
) -> None:
    """The flags every study shares; :func:`parse_recipe_args` reads them. ``default_set`` is the
    study's own recipe overrides: ``--set`` items apply after them, so they add to the study's
    recipe instead of replacing it."""
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"recipe: a config name ({', '.join(configs.names())}) or file (default %(default)s)",
    )
    study_set = f"; applied after this study's own: {' '.join(default_set)}" if default_set else ""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. num_epochs=2 model.dim=64 (Python literals or strings)"
        + study_set,
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=cli.int_at_least(0),
        default=list(default_seeds),
        help="distinct integers >= 0 (default %(default)s)",
    )
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the runs already finished in --out (the others are named and "
        "left out)",
    )
    parser.add_argument(
        "--inference",
        default=None,
        help="bench_int8.py's results.json, read for the inference columns, or 'none' "
        f"(default: {INFERENCE}, where it exists)",
    )
    parser.set_defaults(study_set=list(default_set))


def parse_recipe_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``parser.parse_args(argv)`` plus what the shared flags need checked before any training,
    each problem a usage error naming its flag: repeated ``--seeds``, an ``--out`` that cannot be
    written, a ``--config`` or ``--set`` that does not load, an ``--inference`` file that is not
    there. Adds ``args.recipe``
    (:func:`load_recipe` of the study's own overrides, then ``--set``'s)."""
    args = parser.parse_args(argv)
    repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if repeated:
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats {repeated}")
    problem = reports.unwritable(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    if args.inference not in (None, "none") and not pathlib.Path(args.inference).is_file():
        parser.error(f"--inference {args.inference}: no such file ('none': no inference columns)")
    try:
        args.recipe = load_recipe(args.config, [*args.study_set, *args.set])
    except ValueError as err:
        parser.error(str(err))
    return args


def add_arms_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="train only these arms, by label; the report keeps the other arms' finished runs",
    )


def trainable(
    args: argparse.Namespace, chosen: list[tuple[str, dict]] | None = None
) -> set[str] | None:
    """The labels a study may train (:func:`make_runs`): none with ``--report-only``, else those
    ``--arms`` chose (``chosen``; None: every label)."""
    if args.report_only:
        return set()
    return None if chosen is None else {label for label, _ in chosen}


def choose_arms(
    parser: argparse.ArgumentParser, table: dict[str, dict], selected: list[str] | None
) -> list[tuple[str, dict]]:
    """The arms of ``table`` named by ``--arms`` (all when None), in the table's order; an unknown
    label is a usage error that lists the arms."""
    unknown = sorted(set(selected or ()) - set(table))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {list(table)}")
    return [(label, fields) for label, fields in table.items() if label in (selected or table)]


def check_teacher(
    parser: argparse.ArgumentParser,
    chosen: list[tuple[str, dict]],
    seeds: list[int],
    out: pathlib.Path,
    teacher: tuple[str, int],
) -> None:
    """An arm distilled or converted from ``teacher``'s run (label, seed) needs that run: a usage
    error where the study neither trains it first nor finds it under ``out``."""
    needs = any("distill.teacher" in fields or "init_from" in fields for _, fields in chosen)
    trains = teacher[0] in dict(chosen) and teacher[1] in seeds
    run = out / "runs" / Run(*teacher, config=None).name
    if needs and not trains and not run.exists():
        parser.error(
            f"the distilled and converted arms learn from {teacher[0]} seed {teacher[1]}'s run, "
            f"which is neither in {run} nor among the runs asked for: train it too"
        )


def load_recipe(name_or_path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """A config file's ``get_config()`` with ``KEY=VALUE`` overrides applied in order (dotted
    keys nest; ``configs.override``)."""
    config = configs.load(name_or_path)
    for item in overrides:
        try:
            configs.override(config, configs.parse_overrides([item]))
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from err
    return config


def make_runs(
    recipe: ml_collections.ConfigDict,
    settings: list[tuple[str, dict]],
    seeds: list[int],
    trainable: set[str] | None = None,
) -> list[Run]:
    """One run per (label, seed): the recipe with the label's dotted fields and the seed set.

    A run may train where its label is in ``trainable`` (None: every label); its config is
    validated first (``train.validate_config``), so a study whose label names a setting the model
    cannot honour stops before training anything. The others are only read back where finished
    with the same config (:func:`run_all`).
    """
    runs = []
    for label, fields in settings:
        for seed in seeds:
            config = recipe.copy_and_resolve_references()
            may_train = trainable is None or label in trainable
            try:  # refuse before any training: e.g. a rule that no site of the variant uses
                configs.override(config, {**fields, "seed": seed})
                if may_train:
                    train.validate_config(config)
            except ValueError as err:
                raise SystemExit(f"{label}: {err}") from err
            runs.append(Run(label, seed, config, may_train))
    return runs


def run_all(runs: list[Run], out: pathlib.Path) -> list[dict]:
    """Take every run that may train to its end (``train.train(..., resume="auto")``: a finished
    run is read back, an interrupted one resumes, a run of another config in its folder is
    refused); of the others, read back those finished with the same config and leave the rest
    out, never training them. One result per run (summary + curves)."""
    results, left_out = [], []
    for i, run in enumerate(runs):
        workdir = out / "runs" / run.name
        why = None if run.may_train else _not_reportable(run, workdir)
        if why:  # said after the loop, where there is a report to leave it out of
            left_out.append(f"{workdir}: {why}")
            continue
        print(f"[{i + 1}/{len(runs)}] {run.name}", flush=True)
        try:
            summary = train.train(run.config, workdir, resume="auto")
        except (OSError, ValueError, train.RunDirectoryBusy, train.TrainingDiverged) as err:
            raise SystemExit(f"{run.name}: {err}") from err  # each says what to do
        if summary.get("status") != "finished":  # interrupted: stop the study here
            raise SystemExit(f"{run.name} {summary['status']}; rerun the command to resume")
        records = logs.read_metrics(workdir)
        results.append({"run": run, "summary": summary, "records": records})
    if not results:
        nothing = f"no finished run in {out}/runs to report"
        if not any((out / "runs" / run.name).exists() for run in runs):
            raise SystemExit(f"{nothing}: none of this study's {len(runs)} runs is there")
        raise SystemExit(f"{nothing} ({len(left_out)} left out: {'; '.join(left_out)})")
    for line in left_out:
        print(f"{line}; left out of the report (not among the arms to train)")
    return results


def _not_reportable(run: Run, workdir: pathlib.Path) -> str | None:
    """Why the run in ``workdir`` cannot stand for ``run`` in a report without training (another
    config, not finished, a damaged file), or None where it can."""
    saved = workdir / "config.json"
    try:
        differences = (
            train.config_differences(train.read_json(saved), run.config) if saved.is_file() else []
        )
        if differences:
            return f"another config ({'; '.join(differences)})"
        return "not finished" if train.finished_summary(workdir) is None else None
    except ValueError as err:  # a damaged config.json or summary.json
        return str(err)


def _final_train_accuracy(records: list[dict], total_steps: int, steps_per_epoch: int) -> float:
    """Mean logged train accuracy over the last epoch (each record is a window mean)."""
    last = [
        r["accuracy"]
        for r in records
        if r["split"] == "train" and r["step"] > total_steps - steps_per_epoch
    ]
    return statistics.fmean(last) if last else float("nan")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def budget_epochs(summary: dict) -> float:
    """``train.convert.budget_epochs`` (a run's epochs plus those that made the run it was
    converted from), also for runs converted before their conversion record held
    ``source_epochs``: those read their source's summary. A distilled run's teacher is not
    counted."""
    conversion = summary.get("conversion")
    if conversion is None or "source_epochs" in conversion:
        return train.convert.budget_epochs(summary)
    source, _ = train.finished_run("init_from", pathlib.Path(conversion["init_from"]), whose="its")
    return train.convert.budget_epochs(summary) + budget_epochs(source)


def load_inference(path: str | None) -> dict | None:
    """bench_int8.py's results (its ``--out``): ``path``'s (checked by
    :func:`parse_recipe_args`), or the committed :data:`INFERENCE` where ``path`` is None and that
    file exists; None for ``"none"`` or when there is none."""
    if path == "none" or (path is None and not INFERENCE.is_file()):
        return None
    return json.loads(pathlib.Path(path or INFERENCE).read_text())


def inference_ratios(config: ml_collections.ConfigDict, inference: dict | None) -> dict:
    """``{"float": r, "int8": r}``: the inference time of ``config``'s model over float
    ``multi``'s, from the rows of bench_int8's results whose model has the same graph
    (``nnx.graphdef`` equality: variant, shapes, norms and site options); empty when none was
    timed. A row this version cannot build (another version's variant or option) matches
    nothing."""
    if not inference:
        return {}
    mine = nnx.graphdef(abstract_model(config))
    found = {}
    for row in inference.get("models", []):
        if "variant" not in row or row["form"] in found:
            continue
        try:
            theirs = nnx.eval_shape(
                lambda row=row: models.build(row["variant"], rngs=nnx.Rngs(0), **row["build"])
            )
        except (KeyError, TypeError, ValueError):
            continue
        if nnx.graphdef(theirs) == mine:
            found[row["form"]] = row["over_multi"]
    return found


def aggregate(results: list[dict], inference: dict | None = None) -> list[dict]:
    """One row per label, in the order of first appearance, over its seeds; ``inference`` is
    bench_int8's results (:func:`inference_ratios`)."""
    rows: dict[str, dict] = {}
    for result in results:
        run, summary = result["run"], result["summary"]
        if run.label not in rows:
            empty = {"seeds": [], "final": [], "best": [], "train": []}
            rows[run.label] = {
                "label": run.label,
                **empty,
                **model_costs(run.config),
                "budget": budget_epochs(summary),
                "inference": inference_ratios(run.config, inference),
            }
        row = rows[run.label]
        row.setdefault("time", []).append(summary["train_seconds"])
        row.setdefault("rate", []).append(summary["images_per_second"])
        row["seeds"].append(run.seed)
        row["final"].append(summary["eval_accuracy"])
        row["best"].append(summary["best_eval_accuracy"])
        row["train"].append(
            _final_train_accuracy(
                result["records"], summary["total_steps"], summary["steps_per_epoch"]
            )
        )
    return list(rows.values())


def abstract_model(config: ml_collections.ConfigDict):
    """``config``'s model with shapes and no values (``nnx.eval_shape``): for counting."""
    overrides = train.model_overrides(config)
    return nnx.eval_shape(lambda: models.build(config.variant, rngs=nnx.Rngs(0), **overrides))


def model_costs(config: ml_collections.ConfigDict) -> dict:
    """The parameters of ``config``'s model and its fp32 arithmetic energy per image (uJ,
    ``counts.count_ops``, priced with Horowitz's 45 nm energies)."""
    model = abstract_model(config)
    overrides = train.model_overrides(config)
    shape = (overrides["image_size"], overrides["image_size"], overrides["channels"])
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    energy = counts.count_ops(model, shape).energy_pj("fp32") / 1e6
    return {"params": int(params), "energy_uj": energy}


def equal_energy_mlp_dim(
    recipe: ml_collections.ConfigDict, variant: str, reference: str = "multi"
) -> int:
    """The widest FFN (``model.mlp_dim``, a multiple of 8) at which ``variant`` costs at most the
    fp32 arithmetic energy per image of ``reference``, both on ``recipe``'s model
    (``counts.equal_energy_mlp_dim``)."""

    def config(variant: str, **model) -> ml_collections.ConfigDict:
        c = recipe.copy_and_resolve_references()
        configs.override(c, {"variant": variant, **{f"model.{k}": v for k, v in model.items()}})
        return c

    overrides = train.model_overrides(recipe)
    shape = (overrides["image_size"], overrides["image_size"], overrides["channels"])
    return counts.equal_energy_mlp_dim(
        lambda width: abstract_model(config(variant, mlp_dim=width)),
        abstract_model(config(reference)),
        shape,
    )


def _pct(values: list[float]) -> str:
    mean, sd = _mean_sd(values)
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def is_test_split(split: str) -> bool:
    """Whether ``split`` is (a slice of) a test split, on which nothing may be selected."""
    return split.split("[")[0].strip() == "test"


def _inference_line(inference: dict | None) -> str:
    if not inference:
        return "not timed (no bench_int8.py results; `--inference`)"
    if not any("variant" in row for row in inference.get("models", [])):
        return (
            "not read: the bench_int8.py results are of an older version that did not record "
            "each model's graph; rerun `python experiments/bench_int8.py --out "
            "experiments/results/int8` on an idle machine"
        )
    return (
        f"float and int8 forward time over float multi's, batch {inference['batch']}, "
        f"from `{inference['command']}` on {inference['device']} ({inference['date']}); "
        '"-": that model was not timed'
    )


def _ratio(row: dict, form: str) -> str:
    return f"{row['inference'][form]:.2f}" if form in row.get("inference", {}) else "-"


def markdown_table(rows: list[dict], *, label_header: str, eval_split: str = "validation") -> str:
    """The study's table. Evaluated on a test split, the columns say "test" and the best accuracy
    over the run is left out: a maximum over evaluations on a test split selects on it. Budget:
    :func:`budget_epochs`; inference: :func:`inference_ratios` ("-": not timed)."""
    test = is_test_split(eval_split)
    name = "test" if test else "val"
    best = "" if test else f" best {name} acc (%) |"
    lines = [
        f"| {label_header} | seeds | final {name} acc (%) |{best} train acc, last epoch"
        " (%) | budget (epochs) | train time (s) | images/s | params | energy / image (uJ, fp32)"
        " | inference float / int8 (x float multi) |",
        "|---|---:|---:|" + ("" if test else "---:|") + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        best = "" if test else f" {_pct(row['best'])} |"
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {_pct(row['final'])} |{best} "
            f"{_pct(row['train'])} | {row['budget']:g} | {statistics.fmean(row['time']):.0f} | "
            f"{statistics.fmean(row['rate']):.0f} | {row['params']:,} | {row['energy_uj']:.1f} "
            f"| {_ratio(row, 'float')} / {_ratio(row, 'int8')} |"
        )
    return "\n".join(lines)


def _final_accuracies(results: list[dict]) -> dict[tuple[str, int], dict]:
    """Each run's summary by (label, seed)."""
    return {(r["run"].label, r["run"].seed): r["summary"] for r in results}


def _paired(final: dict, label: str, reference: str) -> tuple[list[int], list[float], float]:
    """The seeds both labels ran, ``label``'s final accuracy minus ``reference``'s on each, and
    one standard error of their mean from the evaluation images alone (:func:`gap_table`)."""
    seeds = [s for (lb, s) in final if lb == label and (reference, s) in final]
    diffs, variance = [], 0.0
    for seed in seeds:
        arm, ref = final[label, seed], final[reference, seed]
        diffs.append(arm["eval_accuracy"] - ref["eval_accuracy"])
        for summary in (arm, ref):
            p = summary["eval_accuracy"]
            variance += p * (1 - p) / summary["eval_examples"]
    return seeds, diffs, (variance**0.5 / len(seeds) if seeds else float("nan"))


def _labels_with(runs: dict, reference: str) -> list[str]:
    """The labels of ``runs`` (keyed by (label, seed)) in order of first appearance; a
    ``reference`` among them is required."""
    labels = list(dict.fromkeys(label for label, _ in runs))
    if reference not in labels:
        raise ValueError(f"reference {reference!r} is not among the labels {labels}")
    return labels


def _per_seed(diffs: list[float], seeds: list[int]) -> str:
    return ", ".join(f"{100 * d:+.1f} (seed {s})" for d, s in zip(diffs, seeds, strict=True))


def gap_table(results: list[dict], *, reference: str, eval_split: str = "validation") -> str:
    """Each other label's final accuracy minus ``reference``'s, in points, paired by seed.

    Columns: the mean difference over the seeds both labels ran, each seed's difference, and one
    standard error of that mean from the finite evaluation set alone: a proportion ``p`` measured
    on ``n`` images has variance ``p (1 - p) / n``, the two accuracies of a pair are independent
    given the models, and the mean over ``k`` pairs divides the variance by ``k``. The spread of
    the per-seed differences is the other source of noise, which that error does not contain.
    """
    final = _final_accuracies(results)
    labels = _labels_with(final, reference)
    name = "test" if is_test_split(eval_split) else "val"
    lines = [
        f"| arm | final {name} acc minus {reference} (points) | per seed | one SE from the "
        f"{name} images |",
        "|---|---:|---:|---:|",
    ]
    for label in labels:
        seeds, diffs, se = _paired(final, label, reference)
        if label == reference or not seeds:
            continue
        lines.append(
            f"| {label} | {100 * statistics.fmean(diffs):+.1f} | {_per_seed(diffs, seeds)} | "
            f"{100 * se:.1f} |"
        )
    return "\n".join(lines)


def control_table(
    results: list[dict], controls: list[tuple[str, str]], *, eval_split: str = "validation"
) -> str:
    """Each ``(arm, control)`` pair's final accuracy difference, paired by seed, with the standard
    error of :func:`gap_table`: an arm against the control given the same help (the same teacher,
    the same budget). A pair that shares no finished seed yet is named below the table, never
    left out in silence."""
    final = _final_accuracies(results)
    name = "test" if is_test_split(eval_split) else "val"
    lines = [
        f"| arm | control | final {name} acc, arm minus control (points) | per seed | one SE "
        f"from the {name} images |",
        "|---|---|---:|---:|---:|",
    ]
    missing = []
    for label, control in controls:
        seeds, diffs, se = _paired(final, label, control)
        if not seeds:
            missing.append(f"{label} against {control}")
            continue
        lines.append(
            f"| {label} | {control} | {100 * statistics.fmean(diffs):+.1f} | "
            f"{_per_seed(diffs, seeds)} | {100 * se:.1f} |"
        )
    if missing:
        lines += ["", f"Not yet comparable (no seed finished by both): {'; '.join(missing)}."]
    return "\n".join(lines)


def eval_curves(results: list[dict]) -> dict[tuple[str, int], dict[float, float]]:
    """Each run's evaluation accuracy by epoch (step over the run's ``steps_per_epoch``)."""
    curves = {}
    for result in results:
        per_epoch = result["summary"]["steps_per_epoch"]
        curves[result["run"].label, result["run"].seed] = {
            r["step"] / per_epoch: r["accuracy"] for r in result["records"] if r["split"] == "eval"
        }
    return curves


def gap_by_epoch_table(
    results: list[dict],
    *,
    reference: str,
    epochs: tuple[float, ...],
    eval_split: str = "validation",
) -> str:
    """Each other label's evaluation accuracy minus ``reference``'s at the evaluations that close
    ``epochs``, in points, mean over the seeds both ran to that epoch ("-": none did); how a gap
    grows or shrinks with training."""
    curves = eval_curves(results)
    labels = _labels_with(curves, reference)
    name = "test" if is_test_split(eval_split) else "val"
    lines = [
        f"| arm | {name} acc minus {reference} (points) at epoch "
        + " | ".join(f"{e:g}" for e in epochs)
        + " |",
        "|---|" + "---:|" * len(epochs),
    ]
    for label in labels:
        if label == reference:
            continue
        cells = []
        for epoch in epochs:
            diffs = [
                curve[epoch] - curves[reference, seed][epoch]
                for (lb, seed), curve in curves.items()
                if lb == label and epoch in curve and epoch in curves.get((reference, seed), {})
            ]
            cells.append(f"{100 * statistics.fmean(diffs):+.1f}" if diffs else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_validation(
    results: list[dict],
    path: pathlib.Path,
    *,
    title: str,
    split_name: str = "validation",
):
    """Evaluation accuracy against epochs, one line per label (mean over seeds, min-max band);
    a label's epochs are those of its runs' ``steps_per_epoch`` (``summary.json``)."""
    import numpy as np
    from matplotlib.figure import Figure

    curves: dict[str, dict[int, list[float]]] = {}
    steps_per_epoch: dict[str, int] = {}
    for result in results:
        steps_per_epoch.setdefault(result["run"].label, result["summary"]["steps_per_epoch"])
        by_step = curves.setdefault(result["run"].label, {})
        for r in result["records"]:
            if r["split"] == "eval":
                by_step.setdefault(r["step"], []).append(r["accuracy"])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, by_step in curves.items():
        steps = sorted(by_step)
        epochs = np.array(steps) / steps_per_epoch[label]
        values = [np.array(by_step[s]) for s in steps]
        mean = np.array([v.mean() for v in values])
        (line,) = ax.plot(epochs, 100 * mean, marker=".", label=label)
        if max(len(v) for v in values) > 1:
            low = np.array([v.min() for v in values])
            high = np.array([v.max() for v in values])
            ax.fill_between(epochs, 100 * low, 100 * high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split_name} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    fig.savefig(path, dpi=120)


def write_report(
    results: list[dict],
    out: pathlib.Path,
    *,
    name: str,
    title: str,
    label_header: str,
    recipe: ml_collections.ConfigDict,
    command: str,
    references: tuple[str, ...] = (),
    controls: tuple[tuple[str, str], ...] = (),
    epoch_gaps: tuple[str, tuple[float, ...]] | None = None,
    inference: dict | None = None,
) -> str:
    """Write ``OUT/<name>.md``, ``OUT/<name>.png`` and ``OUT/<name>.json``; return the table.

    ``controls``: (arm, control) pairs whose paired differences come first, under the table
    (:func:`control_table`); for each label of ``references`` the report adds each arm's
    difference to it (:func:`gap_table`); ``epoch_gaps``: (reference, epochs), each arm's
    difference to the reference along training (:func:`gap_by_epoch_table`); ``inference``:
    bench_int8's results, for the table's inference column.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results, inference)
    table = markdown_table(rows, label_header=label_header, eval_split=recipe.eval_split)
    plot_validation(
        results,
        out / f"{name}.png",
        title=title,
        split_name="test" if is_test_split(recipe.eval_split) else "validation",
    )
    epochs = results[0]["summary"]["total_steps"] / results[0]["summary"]["steps_per_epoch"]
    run_devices = "; ".join(sorted({r["summary"]["device"] for r in results}))
    header = [
        f"# {title}",
        "",
        *reports.header_lines(
            command,
            f"{run_devices}; report written on {timing.describe_device()}",
            hardware_label="hardware of the runs",
        ),
        f"- recipe: dataset {recipe.dataset} ({recipe.train_split} / {recipe.eval_split}), "
        f"{epochs:g} epochs ({results[0]['summary']['total_steps']} steps of "
        f"{recipe.batch_size}, {recipe.warmup_epochs:g} warm-up), {recipe.optimizer} lr "
        f"{recipe.learning_rate:g}, grad clip {recipe.grad_clip:g}, model overrides "
        f"{dict(recipe.model) or 'none'}",
        (
            f"- final: accuracy on the test split ({recipe.eval_split}) at the end (no "
            "best-over-run on a test split); mean ± sample standard deviation over seeds"
            if is_test_split(recipe.eval_split)
            else "- final/best: validation accuracy at the end and its best over the run's "
            "evaluations; mean ± sample standard deviation over seeds"
        ),
        f"- training time: {sum(r['summary']['train_seconds'] for r in results) / 3600:.1f} h "
        f"for {len(results)} runs",
        f"- inference: {_inference_line(inference)}",
        "",
        table,
        "",
    ]
    if controls:
        header += [
            "Each arm against the control given the same help (teacher and loss, or budget), "
            "paired by seed:",
            "",
            control_table(results, list(controls), eval_split=recipe.eval_split),
            "",
        ]
    for reference in references:
        header += [
            gap_table(results, reference=reference, eval_split=recipe.eval_split),
            "",
        ]
    if epoch_gaps is not None:
        reference, epochs = epoch_gaps
        header += [
            f"The gap to {reference} along training (mean over the seeds both ran that far):",
            "",
            gap_by_epoch_table(
                results, reference=reference, epochs=epochs, eval_split=recipe.eval_split
            ),
            "",
        ]
    header += [
        f"![validation curves]({name}.png)",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(header))
    record = [{"label": r["run"].label, "seed": r["run"].seed, **r["summary"]} for r in results]
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return table


def run_and_report(
    runs: list[Run],
    out: pathlib.Path,
    *,
    name: str,
    title: str,
    label_header: str,
    recipe: ml_collections.ConfigDict,
    argv: list[str] | None,
    references: tuple[str, ...] = (),
    controls: tuple[tuple[str, str], ...] = (),
    epoch_gaps: tuple[str, tuple[float, ...]] | None = None,
    inference: dict | None = None,
) -> str:
    """Train ``runs`` (:func:`run_all`: those that may train), write the report of the finished
    ones (:func:`write_report`), print the table.

    ``name`` is also the script's name (``experiments/<name>.py``) in the report's command line;
    ``references``: the labels among the runs' to which the report gives paired differences;
    ``controls`` and ``epoch_gaps``: :func:`write_report`'s (a reference without runs yet is
    left out).
    """
    results = run_all(runs, out)  # refuses when there is none to report
    labels = {result["run"].label for result in results}
    references = tuple(r for r in references if r in labels)
    if epoch_gaps is not None and epoch_gaps[0] not in labels:
        epoch_gaps = None
    table = write_report(
        results,
        out,
        name=name,
        title=title,
        label_header=label_header,
        recipe=recipe,
        command=reports.command_line(f"{name}.py", argv),
        references=references,
        controls=controls,
        epoch_gaps=epoch_gaps,
        inference=inference,
    )
    print(table)
    return table
