"""The trainer: sharding, multi-process, checkpoints and resumption, guard rails, end to end."""

import importlib
import itertools
import json
import os
import pathlib
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_worker import TINY, run_worker, summary_of, train_losses

from addervit_jax import cli, configs, data, logs, train
from addervit_jax.configs import digits
from addervit_jax.models import sites


def _config(**overrides):
    config = digits.get_config()
    config.update_from_flattened_dict(
        {k.removeprefix("config."): v for k, v in {**TINY, **overrides}.items()}
    )
    return config


def test_eight_devices_match_one_device(tmp_path):
    one = run_worker(tmp_path / "one", {"config.total_steps": 6})
    eight = run_worker(tmp_path / "eight", {"config.total_steps": 6}, devices=8)
    assert eight["device"].startswith("8 x cpu (") and one["device"].startswith("cpu (")
    # data parallel over 8 devices is the same arithmetic up to the order of the reductions
    np.testing.assert_allclose(
        train_losses(tmp_path / "eight"), train_losses(tmp_path / "one"), rtol=2e-5
    )
    assert eight["params_checksum"] == pytest.approx(one["params_checksum"], rel=1e-5)
    fsdp = run_worker(tmp_path / "fsdp", {"config.total_steps": 6, "config.fsdp": True}, devices=8)
    np.testing.assert_allclose(
        train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "one"), rtol=2e-5
    )
    assert fsdp["params_checksum"] == pytest.approx(one["params_checksum"], rel=1e-5)


def test_batch_statistics_of_eight_devices_are_those_of_the_global_batch(tmp_path):
    # norm="batch": per-unit statistics over the global batch, whatever its sharding
    steps = {"config.total_steps": 4, "config.model.norm": "batch"}
    one = run_worker(tmp_path / "one", steps)
    eight = run_worker(tmp_path / "eight", steps, devices=8)
    np.testing.assert_allclose(
        train_losses(tmp_path / "eight"), train_losses(tmp_path / "one"), rtol=2e-5
    )
    assert eight["params_checksum"] == pytest.approx(one["params_checksum"], rel=1e-5)
    rests = [train.restore(tmp_path / name)[0].rest for name in ("one", "eight")]
    stats = [
        {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(r)}
        for r in rests
    ]
    running = [k for k in stats[0] if "batch_norm" in k]
    assert len(running) == 2 * 5  # mean and var of the q, k, v and two FFN sites of 1 block
    for k in running:
        np.testing.assert_allclose(stats[1][k], stats[0][k], rtol=1e-4, atol=1e-5)
        assert not np.allclose(stats[0][k], 0.0) or "mean" not in k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, overrides):
    """Two background workers of one ``jax.distributed`` run in ``workdir``."""
    port = _free_port()
    return [
        run_worker(
            workdir,
            {
                **overrides,
                "config.distributed": True,
                "config.coordinator_address": f"127.0.0.1:{port}",
                "config.num_processes": 2,
                "config.process_id": i,
            },
            background=True,
        )
        for i in range(2)
    ]


def test_two_processes_through_jax_distributed_agree(tmp_path):
    procs = _two_processes(tmp_path / "run", {"config.total_steps": 4})
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    first, second = (summary_of(out) for out, _ in outs)
    assert "2 process(es)" in first["device"]
    assert first["params_checksum"] == second["params_checksum"]
    assert first["eval_accuracy"] == second["eval_accuracy"]
    single = run_worker(tmp_path / "single", {"config.total_steps": 4}, devices=2)
    assert first["params_checksum"] == pytest.approx(single["params_checksum"], rel=1e-5)


def test_a_preempted_multi_process_run_saves_once_at_one_step_on_every_process(tmp_path):
    # An Orbax save needs every process. SIGTERM to one process reaches all of them through JAX's
    # preemption service; each stops at the same sync point after the same checkpoint.
    steps = {"config.total_steps": 100_000, "config.checkpoint_every_steps": 100_000}
    procs = _two_processes(tmp_path / "run", steps)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    first, second = (summary_of(out) for out, _ in outs)
    assert first["status"] == second["status"] == "preempted"
    assert first["steps"] == second["steps"] < 100_000
    assert first["params_checksum"] == second["params_checksum"]
    saved = (tmp_path / "run" / "checkpoints").iterdir()
    assert sorted(int(d.name) for d in saved if d.name.isdigit()) == [first["steps"]]


def _interrupt(workdir, overrides, *, after_lines):
    """Train in the background and send SIGTERM once ``metrics.jsonl`` has ``after_lines``."""
    proc = run_worker(workdir, overrides, background=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = summary_of(out)
    assert summary["status"] == "interrupted by SIGTERM", summary
    return summary


def test_sigterm_twice_then_resume_is_bit_identical_and_reports_the_whole_run(tmp_path):
    steps = {
        "config.total_steps": 300,
        "config.checkpoint_every_steps": 100,
        "config.eval_every_steps": 20,
        "resume": "auto",
    }
    run = tmp_path / "interrupted"
    first = _interrupt(run, steps, after_lines=60)
    second = _interrupt(run, steps, after_lines=len(train_losses(run)) + 60)
    assert 20 <= first["steps"] < second["steps"] < 300
    resumed = run_worker(run, steps)
    straight = run_worker(tmp_path / "straight", steps)
    assert resumed["steps"] == straight["steps"] == 300
    # bit-identical on CPU: same data order and augmentation keys (functions of the step),
    # same restored optimiser state, deterministic XLA:CPU kernels
    state_a, _, _ = train.restore(run)
    state_b, _, _ = train.restore(tmp_path / "straight")
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(state_a.opt_state), jax.tree.leaves(state_b.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the summary covers every session: the best evaluation, the images, the time
    evals = [r["accuracy"] for r in logs.read_metrics(run) if r["split"] == "eval"]
    assert len(evals) == 300 // 20  # 14 periodic evaluations and the final one
    for field in ("total_steps", "steps_per_epoch", "images_seen", "eval_accuracy"):
        assert resumed[field] == straight[field], field
    assert resumed["best_eval_accuracy"] == straight["best_eval_accuracy"] == max(evals)
    assert resumed["images_seen"] == 300 * 32
    assert resumed["train_seconds"] > second["train_seconds"] > first["train_seconds"]
    # "auto" on the finished run reads it back: nothing trained, nothing written
    before = (run / "metrics.jsonl").read_bytes()
    assert run_worker(run, steps) == resumed
    assert (run / "metrics.jsonl").read_bytes() == before


def test_the_best_evaluation_of_earlier_sessions_is_remembered(tmp_path):
    records = [(10, 0.9), (20, 0.5), (40, 0.95)]  # step 40 after the checkpoint at 30: redone
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, accuracy in records:
            f.write(json.dumps({"step": step, "split": "eval", "accuracy": accuracy}) + "\n")
    log = logs.RunLog(tmp_path, total_steps=50, start_step=30)
    assert log.best_eval_accuracy() == 0.9
    log.eval(40, {"accuracy": 0.6, "loss": 1.0, "count": 10})
    assert log.best_eval_accuracy() == 0.9
    log.close()
    assert logs.RunLog(tmp_path, total_steps=50, start_step=0).best_eval_accuracy() is None


def test_resume_auto_starts_resumes_reads_back_and_refuses_another_config(tmp_path):
    config = _config(**{"config.total_steps": 2})
    fresh = train.train(config, tmp_path / "run", resume="auto")
    steps_per_epoch = train.make_inputs(config).steps_per_epoch
    assert fresh["status"] == "finished" and fresh["steps_per_epoch"] == steps_per_epoch
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert train.train(config, tmp_path / "run", resume="auto") == json.loads(
        (tmp_path / "run" / "summary.json").read_text()
    )
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    # a run made before a config field existed counts as having its default: still read back
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["distill"]["feature_weight"], saved["distill"]["feature_kernel"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert train.train(config, tmp_path / "run", resume="auto")["steps"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    other = _config(**{"config.total_steps": 2, "config.seed": 1})
    with pytest.raises(ValueError, match=r"holds a run of another config: seed: 0 \(run\) != 1"):
        train.train(other, tmp_path / "run", resume="auto")
    with pytest.raises(ValueError, match="resume='yes'"):
        train.train(config, tmp_path / "new", resume="yes")


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    config = _config(**{"config.total_steps": 6, "config.checkpoint_every_steps": 3})
    train.train(config, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())  # as if interrupted at step 6
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [3, 6]
    for f in (ckpts / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step 6 .* could not be restored"):
        state, meta, _ = train.restore(tmp_path)
    assert meta["step"] == 3 and int(state.step) == 3


def test_resume_refuses_to_overwrite_without_flag(tmp_path):
    config = _config(**{"config.total_steps": 2})
    train.train(config, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(config, tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config(
        **{
            "config.total_steps": 30,
            "config.checkpoint_every_steps": 1,
            "config.optimizer": "sgd",
            "config.learning_rate": 1e30,
            "config.grad_clip": 0.0,
            "config.warmup_epochs": 0.0,
        }
    )
    with pytest.raises(train.TrainingDiverged, match="loss became") as info:
        train.train(config, tmp_path)
    state, meta, _ = train.restore(tmp_path)
    assert meta["step"] >= 1 and f"step {meta['step']}, is kept" in str(info.value)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            {"config.variant": "qkv_2ffn_wopout", "config.model.dim_head": 4},
            ["dim_head=4", "dim=16"],
        ),
        ({"config.dataset": "svhn"}, ["dataset='svhn'"]),
        ({"config.optimizer": "lamb"}, ["optimizer='lamb'"]),
        ({"config.learning_rate": 0.0}, ["learning_rate"]),
        ({"config.model.patch_size": 3}, ["patch_size=3"]),
    ],
)
def test_impossible_configs_fail_before_compute(tmp_path, overrides, fragments):
    config = _config(**overrides)
    with pytest.raises(ValueError) as info:
        train.train(config, tmp_path / "run")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not (tmp_path / "run").exists()


def test_cli_trains_on_digits_and_evaluates(tmp_path, capsys):
    # The README's main command at a shorter budget: it must learn.
    args = ["train", "--workdir", str(tmp_path), "--config.num_epochs=15"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "variant",
        "dataset",
        "steps",
        "eval_accuracy",
        "train_seconds",
        "images_per_second",
    ):
        assert key in summary
    assert summary["variant"] == "qkv_2ffn" and summary["dataset"] == "digits"
    assert summary["eval_accuracy"] > 0.6
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "config.json").exists()
    # TensorBoard event files beside metrics.jsonl hold the same numbers (float32 scalars)
    scalars = _tensorboard_scalars(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = {
        (f"{r['split']}/{k}", r["step"]): np.float32(v)
        for r in records
        for k, v in r.items()
        if k not in ("step", "split")
    }
    assert scalars == expected and ("eval/accuracy", summary["steps"]) in scalars
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert result["count"] == 360
    # the int8 form beside the float model, calibrated on training batches
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["float"]["accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert result["int8"]["count"] == 360
    assert abs(result["int8"]["accuracy"] - result["float"]["accuracy"]) <= 0.03
    assert result["calibration"] == {"split": "train", "images": 4 * 64, "augmentation": False}
    # only the adder sites on integers: the multiplication sites are named among those left float
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--int8", "--kinds", "adder"]) == 0
    only = json.loads(capsys.readouterr().out)
    assert set(only["int8_sites"]) == {"adder"}
    assert only["int8_sites"]["adder"] == result["int8_sites"]["adder"]
    assert any(site.endswith("(multi)") for site in only["float_sites"])
    assert only["float"] == result["float"]
    with pytest.raises(ValueError, match=r"kinds=\('adder',\) chooses the sites .* int8=True"):
        train.evaluate_workdir(tmp_path, kinds=("adder",))


def _tensorboard_scalars(workdir: pathlib.Path) -> dict:
    """{(tag, step): value} of the event files in ``workdir``, read as TFRecords of Event protos."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at : at + 8])
            event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
            at += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = np.float32(value.simple_value)
    return scalars


def test_cli_rejects_unknown_config_fields(tmp_path):
    with pytest.raises(SystemExit, match="varaint"):
        cli.main(["train", "--workdir", str(tmp_path), "--config.varaint=multi"])
    with pytest.raises(SystemExit, match="neither a file nor"):
        cli.main(["train", "--config", "nonexistent"])


def test_cli_none_turns_a_tuple_field_off():
    # config_flags parses "None" for a tuple field as (None,); the digits recipe's RandAugment
    # must be switchable off from the command line
    config = cli._parse_train_flags(["--config.randaugment=None"]).config
    assert config.randaugment is None
    config = cli._parse_train_flags(["--config.randaugment=(2, 9)"]).config
    assert tuple(config.randaugment) == (2, 9)


def _shared_tfds():
    root = os.environ.get("TFDS_DATA_DIR") or str(
        pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tfds"
    )
    if not (pathlib.Path(root) / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 in TFDS format not found at {root}")
    return root


def test_streamed_input_trains_exactly_like_in_memory(tmp_path, monkeypatch):
    # ImageNet-sized datasets stream through Grain; CIFAR-10 can take either path, and the two
    # must give the same batches, hence the same losses and the same evaluation.
    monkeypatch.setenv("ADDERVIT_CACHE_DIR", str(tmp_path / "cache"))
    common = {
        "config.dataset": "cifar10",
        "config.data_dir": _shared_tfds(),
        "config.train_split": "train[:128]",
        "config.eval_split": "train[128:200]",
        "config.model.patch_size": 8,
        "config.total_steps": 3,
        "config.stream_workers": 0,
    }
    summaries = {
        stream: train.train(_config(**common, **{"config.stream": stream}), tmp_path / str(stream))
        for stream in (False, True)
    }
    assert train_losses(tmp_path / "True") == train_losses(tmp_path / "False")
    assert summaries[True]["eval_accuracy"] == summaries[False]["eval_accuracy"]
    assert summaries[True]["eval_examples"] == 72


@pytest.mark.parametrize("name", configs.names())
def test_every_packaged_config_is_valid(name):
    module = importlib.import_module(f"addervit_jax.configs.{name}")
    assert "addervit train --config" in module.__doc__
    train.validate_config(module.get_config())


def test_overrides_set_existing_fields_and_name_the_unknown_ones():
    # the one way to override a config from code and from the experiments' --set
    items = ["num_epochs=2", "model.dim=64", "randaugment=(2, 14)", "distill.teacher=runs/m"]
    overrides = configs.parse_overrides([*items, "flip=None"])
    assert overrides == {
        "num_epochs": 2,
        "model.dim": 64,
        "randaugment": (2, 14),
        "distill.teacher": "runs/m",
        "flip": None,
    }
    config = configs.override(configs.load("cifar10"), overrides)
    assert config.num_epochs == 2.0 and isinstance(config.num_epochs, float)
    assert config.model.dim == 64 and config.model.depth == 4  # model.*: the rest is kept
    assert config.randaugment == (2, 14) and config.distill.teacher == "runs/m"
    assert config.flip is None
    for key in ("num_epoch", "distill.teachr", "variant.name"):
        with pytest.raises(ValueError, match=f"no field '{key}'"):
            configs.override(config, {key: 1})
    with pytest.raises(ValueError, match="batch_size"):
        configs.override(config, {"batch_size": "many"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        configs.parse_overrides(["num_epochs"])


def test_metrics_of_a_resumed_run_keep_the_last_record_of_each_step(tmp_path):
    # a run killed without a checkpoint at its last steps repeats them after --resume
    from addervit_jax import logs

    lines = [
        {"step": 1, "split": "train", "loss": 3.0},
        {"step": 2, "split": "train", "loss": 2.0},
        {"step": 2, "split": "eval", "accuracy": 0.1},
        {"step": 2, "split": "train", "loss": 1.5},  # the resumed run's step 2
        {"step": 3, "split": "train", "loss": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = logs.read_metrics(tmp_path)
    assert [(r["split"], r["step"], r.get("loss")) for r in records] == [
        ("train", 1, 3.0),
        ("eval", 2, None),
        ("train", 2, 1.5),
        ("train", 3, 1.0),
    ]


def test_distill_loss_matches_float64_formula():
    rng = np.random.default_rng(11)
    student, teacher = rng.normal(size=(2, 5, 7)) * 3.0
    temperature = 2.5

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(teacher / temperature), log_softmax(student / temperature)
    expected = temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)
    got = train.distill_loss(student.astype(np.float32), teacher.astype(np.float32), temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(train.distill_loss(teacher, teacher, temperature)) < 1e-6)


def _feature_loss_float64(student, teacher, kernel):
    """The feature term of ``train.distill`` in float64 NumPy, by its definition."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        z = [
            (f - f.mean(-1, keepdims=True)) / np.sqrt(f.var(-1, keepdims=True) + 1e-5)
            for f in (s, t)
        ]
        if kernel == "none":
            terms.append(((z[0] - z[1]) ** 2).mean(axis=(1, 2)))
            continue
        d = s.shape[-1]
        l1 = np.abs(z[0][:, :, None] - z[0][:, None, :]).sum(-1)
        l2 = ((z[1][:, :, None] - z[1][:, None, :]) ** 2).sum(-1)
        k_s = np.exp(-l1 / (2 * d / np.sqrt(np.pi)))
        k_t = np.exp(-l2 / (2 * d))
        terms.append(((k_s - k_t) ** 2).mean(axis=(1, 2)))
    return np.mean(terms, axis=0)


@pytest.mark.parametrize("kernel", ["none", "pkkd"])
def test_feature_loss_matches_float64_formula(kernel):
    rng = np.random.default_rng(12)
    student = [rng.normal(size=(3, 6, 8)) * 2.0 + 1.0, rng.normal(size=(3, 6, 8))]
    teacher = [rng.normal(size=(3, 6, 8)) * 0.5, rng.normal(size=(3, 6, 8)) + 3.0]
    got = train.feature_loss(
        [x.astype(np.float32) for x in student], [x.astype(np.float32) for x in teacher], kernel
    )
    expected = _feature_loss_float64(student, teacher, kernel)
    assert got.shape == (3,) and np.all(expected > 1e-3)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
    # zero when the student's tokens are the teacher's up to a per-token scale and offset
    same = train.feature_loss([x * 3.0 + 1.0 for x in teacher], teacher, "none")
    assert np.all(np.asarray(same) < 1e-6)
    # the gradient: central differences of the float64 formula on one coordinate
    grad = jax.grad(lambda f: train.feature_loss([f, student[1]], teacher, kernel).sum())(
        jnp.asarray(student[0], jnp.float32)
    )
    h, index = 1e-5, (1, 2, 3)
    up, down = [x.copy() for x in student], [x.copy() for x in student]
    up[0][index] += h
    down[0][index] -= h
    numeric = (
        _feature_loss_float64(up, teacher, kernel).sum()
        - _feature_loss_float64(down, teacher, kernel).sum()
    ) / (2 * h)
    np.testing.assert_allclose(grad[index], numeric, rtol=2e-3, atol=1e-6)


def test_params_only_run_evaluates_and_teaches(tmp_path):
    teacher_dir = tmp_path / "teacher"
    summary = train.train(
        _config(**{"config.variant": "multi", "config.total_steps": 5}), teacher_dir
    )
    # the compact form a repository keeps: config, summary, metrics, params.msgpack
    import shutil

    shutil.rmtree(teacher_dir / "checkpoints")
    assert (teacher_dir / train.PARAMS_FILE).stat().st_size < 200_000
    result = train.evaluate_workdir(teacher_dir)
    assert result["step"] == 5 and result["accuracy"] == pytest.approx(summary["eval_accuracy"])

    student = _config(**{"config.total_steps": 3, "config.distill.teacher": str(teacher_dir)})
    student.distill.weight = 0.5
    out = train.train(student, tmp_path / "student")
    assert out["teacher"]["workdir"] == str(teacher_dir) and out["teacher"]["variant"] == "multi"
    records = [
        json.loads(line)
        for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == 3
    for r in train_records:  # both terms logged; the loss is their weighted sum
        assert r["distill_loss"] > 0
        assert r["loss"] == pytest.approx(r["ce_loss"] + 0.5 * r["distill_loss"], rel=1e-5)

    # a teacher of another dataset fails before training, naming both
    wrong = tmp_path / "wrong_teacher"
    shutil.copytree(teacher_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "dataset": "cifar10"}))
    student.distill.teacher = str(wrong)
    with pytest.raises(ValueError, match="trained on 'cifar10' \\(10 classes, 32 px"):
        train.train(student, tmp_path / "student2")
    assert not (tmp_path / "student2").exists()
    student.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        train.train(student, tmp_path / "student3")

    # feature distillation: every block's output matched, the term logged and weighted
    student = _config(**{"config.total_steps": 2, "config.distill.teacher": str(teacher_dir)})
    student.distill.feature_weight = 2.0
    student.distill.feature_kernel = "pkkd"
    train.train(student, tmp_path / "features")
    records = [json.loads(line) for line in open(tmp_path / "features" / "metrics.jsonl")]
    for r in (r for r in records if r["split"] == "train"):
        assert 0 < r["feature_loss"] < 1
        expected = r["ce_loss"] + r["distill_loss"] + 2.0 * r["feature_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    # a teacher of another depth cannot teach features: refused before the run directory exists
    deeper = _config(**{"config.variant": "multi", "config.total_steps": 1})
    deeper.model.depth = 2
    train.train(deeper, tmp_path / "deeper")
    student.distill.teacher = str(tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"features of distill.teacher=.* do not match"):
        train.train(student, tmp_path / "features2")
    assert not (tmp_path / "features2").exists()
    student.distill.teacher = None
    with pytest.raises(ValueError, match="feature_weight=2.0 needs a teacher"):
        train.train(student, tmp_path / "features3")


def _convert_from_multi(tmp_path, **overrides):
    """A 5-step ``multi`` run in ``tmp_path/multi``, and a ``qkv_2ffn`` config (``overrides``)
    converted from it into ``tmp_path`` (60 fit steps on 2 batches): ``(source, config, inputs,
    initial state, converted state, conversion record)``."""
    source = tmp_path / "multi"
    train.train(_config(**{"config.variant": "multi", "config.total_steps": 5}), source)
    config = _config(
        **{
            "config.total_steps": 1,
            "config.init_from": str(source),
            "config.init_fit_steps": 60,
            "config.init_fit_batches": 2,
            **overrides,
        }
    )
    inputs = train.make_inputs(config)
    state = train.create_train_state(config, total_steps=1, steps_per_epoch=1)
    converted = train.convert.convert(config, state, inputs, tmp_path)
    record = json.loads((tmp_path / "conversion.json").read_text())
    return source, config, inputs, state, converted, record


def test_conversion_copies_matching_parameters_and_fits_the_other_sites(tmp_path):
    source, config, inputs, state, converted, record = _convert_from_multi(tmp_path)
    teacher = train.restore(source)[0]
    flat = lambda s: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(s)}  # noqa: E731
    mine, theirs, initial = flat(converted.params), flat(teacher.params), flat(state.params)
    same = [k for k in mine if any(s in k for s in ("embed", "norm", "head", "to_out"))]
    assert same and record["copied"] == len(same)
    for k in same:  # copied: the embedding, the LayerNorms, the output projection, the head
        np.testing.assert_array_equal(mine[k], theirs[k])
    # the adder sites (q, k, v and the FFN of the one block), in the order the forward calls them
    sites = [f["site"] for f in record["fitted"]]
    assert sites == [
        f"blocks.0.{s}" for s in ("attn.to_q", "attn.to_k", "attn.to_v", "ffn.fc1", "ffn.fc2")
    ]
    for fit in record["fitted"]:
        assert fit["from"] == "Dense" and fit["to"] == "AdderDense"
        assert fit["relative_error_after"] < 0.8 * fit["relative_error_before"], fit
    assert not np.array_equal(
        mine["['blocks'][0]['attn']['to_q']['kernel'].value"],
        initial["['blocks'][0]['attn']['to_q']['kernel'].value"],
    )
    # through train: the summary reports the fit
    summary = train.train(config, tmp_path / "run")
    assert [f["site"] for f in summary["conversion"]["fitted"]] == sites
    # refused before anything is created: another depth, a run that did not finish
    deeper = _config(
        **{"config.variant": "multi", "config.total_steps": 1, "config.model.depth": 2}
    )
    train.train(deeper, tmp_path / "deeper")
    config.init_from = str(tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"init_from=.*deeper.* not of this run's shape"):
        train.train(config, tmp_path / "refused")
    # a wider FFN has the same features but sites of other shapes: refused, naming the first
    config.init_from = str(source)
    config.model.mlp_dim = 64
    with pytest.raises(
        ValueError, match=r"its site blocks.0.ffn.fc1 is 16 -> 32 features, this run's is 16 -> 64"
    ):
        train.train(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config.model.mlp_dim, config.init_from = 32, str(tmp_path / "deeper")
    summary_path = tmp_path / "deeper" / "summary.json"
    summary_path.write_text(
        json.dumps({**json.loads(summary_path.read_text()), "status": "preempted"})
    )
    with pytest.raises(ValueError, match="did not finish"):
        train.train(config, tmp_path / "refused")


def test_conversion_fits_batch_norm_sites_as_they_train_and_evaluates_them_alike(tmp_path):
    source, config, inputs, _, converted, record = _convert_from_multi(
        tmp_path, **{"config.model.norm": "batch"}
    )
    assert record["fit"]["tokens_per_site"] < 4096  # every token of the two batches: x below
    source_model = train.inference_model(
        *(getattr(train.restore(source)[0], k) for k in ("graphdef", "params", "rest"))
    )
    student = train.inference_model(converted.graphdef, converted.params, converted.rest)
    images = [
        data.preprocess(None, batch["image"], inputs.info, train=False)
        for _, batch in itertools.islice(inputs.train_batches(0), 2)
    ]
    paths = [tuple(f["site"].split(".")) for f in record["fitted"]]
    paths = [tuple(int(p) if p.isdigit() else p for p in path) for path in paths]
    recorded, _ = sites.record_inputs(student, paths, images)
    for fit, path in zip(record["fitted"], paths, strict=True):
        assert fit["to"] == "AdderDense"
        assert fit["relative_error_after"] < 0.5 * fit["relative_error_before"], fit
        site, x = sites.module_at(student, path), jnp.asarray(recorded[path])
        target = np.asarray(sites.module_at(source_model, path)(x), np.float64)
        evaluated = np.asarray(site(x), np.float64)
        site.train()  # batch statistics of x: what the first training steps see
        trained = np.asarray(site(x), np.float64)
        site.eval()
        error = np.linalg.norm(evaluated - target) / np.linalg.norm(target)
        assert error == pytest.approx(fit["relative_error_after"], rel=1e-3)
        np.testing.assert_allclose(trained, evaluated, rtol=1e-3, atol=1e-3 * np.abs(target).max())

    # from a finished norm=batch run: a site of the same type and norm keeps its running
    # statistics (copied, not fitted); one of the same type but another norm is fitted
    train.train(config, tmp_path / "batch")
    finished = train.restore(tmp_path / "batch")[0]
    for variant, norm, fitted in (("all_adder", "batch", "to_out"), ("qkv_2ffn", "layer", "to_q")):
        other = _config(
            **{
                "config.variant": variant,
                "config.init_from": str(tmp_path / "batch"),
                "config.init_fit_steps": 2,
                "config.init_fit_batches": 1,
                "config.model.norm": norm,
            }
        )
        state = train.create_train_state(other, total_steps=1, steps_per_epoch=1)
        (tmp_path / variant).mkdir()
        result = train.convert.convert(other, state, inputs, tmp_path / variant)
        record = json.loads((tmp_path / variant / "conversion.json").read_text())
        assert any(f["site"].endswith(fitted) for f in record["fitted"]), record
        if norm == "batch":
            assert not any(f["site"].endswith("to_q") for f in record["fitted"])
            flat = lambda s: dict(jax.tree_util.tree_leaves_with_path(s))  # noqa: E731
            mine, theirs = flat(result.rest), flat(finished.rest)
            stats = [k for k in mine if "to_q" in jax.tree_util.keystr(k)]
            assert stats and all(np.array_equal(mine[k], theirs[k]) for k in stats)
    assert not (tmp_path / "refused").exists()
