"""Nothing lost, nothing silent (issue 12): damaged checkpoints, one writer per run directory,
resume checks, partial logs, a damaged kernel cache, float64, and one-line errors. Nothing
overwritten, nothing nonsensical accepted (issue 35): runs never replaced without --overwrite,
models that are not finite never finished, numbers and splits checked before anything exists."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_worker import TINY

from addervit_jax import cli, configs, logs, models, ops, train
from addervit_jax.configs import digits
from addervit_jax.kernels import cpu_native


def _config(**overrides):
    config = digits.get_config()
    config.update_from_flattened_dict(
        {k.removeprefix("config."): v for k, v in {**TINY, **overrides}.items()}
    )
    return config


def _steps(run: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _data_files(run: pathlib.Path, step: int) -> list[pathlib.Path]:
    files = _data_files_in(run / "checkpoints" / str(step))
    assert files, f"no data files under step {step}"
    return files


def _data_files_in(checkpoint: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in (checkpoint / "state").rglob("d/*") if f.is_file()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4, copied fresh for each test that damages it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    config = _config(**{"config.total_steps": 4, "config.checkpoint_every_steps": 2})
    summary = train.train(config, run)
    assert _steps(run) == [2, 4]
    return run, config, summary


def _copy(run, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _interrupted(run: pathlib.Path) -> pathlib.Path:
    """``run`` as a session stopped by SIGTERM after its last checkpoint leaves it: --resume
    continues it (a finished run is read back instead)."""
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted by SIGTERM"
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_resume_after_a_damaged_newest_checkpoint_rewrites_it(finished_run, tmp_path):
    run, config, summary = finished_run
    run = _interrupted(_copy(run, tmp_path))
    for f in _data_files(run, 4):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    with pytest.warns(UserWarning, match="step 4 .* could not be restored"):
        resumed = train.train(config, run, resume=True)
    assert resumed["steps"] == 4
    # the damaged step 4 was replaced by the resumed run's step 4, which restores without warning
    state, meta, _ = train.restore(run)
    assert meta["step"] == 4 and int(state.step) == 4
    assert resumed["params_checksum"] == summary["params_checksum"]  # bit-identical on CPU
    # the damaged one was moved aside, not deleted
    (aside,) = (run / "checkpoints_damaged").iterdir()
    assert aside.name.startswith("4-") and _data_files_in(aside)


def test_resume_with_every_checkpoint_damaged_refuses(finished_run, tmp_path, capsys):
    run, config, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    for step in (2, 4):
        for f in _data_files(run, step):
            f.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"steps \[4, 2\] are damaged"):
        train.train(config, run, resume=True)
    assert _steps(run) == [2, 4]  # nothing overwritten


def test_every_checkpoint_damaged_the_verdict_is_the_last_line_and_not_buried(
    finished_run, tmp_path
):
    # The failed reads' echo (asyncio callbacks on Orbax's closed loop, unretrieved futures)
    # printed 197 tracebacks here before; a probe of a larger run counted ~18,000 lines.
    run, _, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    for f in _data_files(run, 4):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    for f in _data_files(run, 2):
        f.write_bytes(b"")
    flags = [f"--{k}={v}" for k, v in {**TINY, "config.total_steps": 4}.items()]
    flags.append("--config.checkpoint_every_steps=2")
    out = subprocess.run(
        [sys.executable, "-m", "addervit_jax.cli", "train", f"--workdir={run}", "--resume", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 1
    assert lines[-1].startswith("addervit train: --resume: no checkpoint in")
    assert "steps [4, 2] are damaged" in lines[-1]
    assert len(lines) <= 5, "\n".join(lines[:20])  # two warnings (two lines each), the verdict
    assert sum("could not be restored" in line for line in lines) == 2
    assert _steps(run) == [2, 4]


def _flip(files):
    for f in files:
        raw = bytearray(f.read_bytes())
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
        f.write_bytes(bytes(raw))


def test_flipped_bytes_are_detected(finished_run, tmp_path, capsys):
    # an unfinished run gives its newest checkpoint that restores, naming the damaged one
    run, _, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    _flip(_data_files(run, 4))
    with pytest.warns(UserWarning, match="step 4 .* could not be restored"):
        _, meta, _ = train.restore(run)
    assert meta["step"] == 2
    with pytest.warns(UserWarning, match="step 4"):
        assert cli.main(["eval", "--checkpoint", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2


@pytest.mark.filterwarnings("error")  # no fallback, no warning
def test_the_final_state_of_a_finished_run_is_its_params_file(finished_run, tmp_path, capsys):
    # its newest checkpoint damaged: evaluation reads params.msgpack, the final state, and
    # reports the run's own final step and accuracy (before: step 2's, with a warning)
    run, _, summary = finished_run
    run = _copy(run, tmp_path)
    _flip(_data_files(run, 4))
    state, meta, _ = train.restore(run)
    assert meta == {"step": 4, "source": train.PARAMS_FILE} and int(state.step) == 4
    assert cli.main(["eval", "--checkpoint", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["accuracy"] == summary["eval_accuracy"]
    # resume reads it back, nothing written
    before = _files(run)
    assert train.train(finished_run[1], run, resume=True)["steps"] == 4
    assert _files(run) == before
    # a student distilled from it is distilled from the final state, and its record says so
    student = _config(
        **{"config.total_steps": 1, "config.distill.teacher": str(run), "config.warmup_epochs": 0}
    )
    record = train.train(student, tmp_path / "student")["teacher"]
    assert record["step"] == 4 and record["params_checksum"] == summary["params_checksum"]
    assert record["eval_accuracy"] == summary["eval_accuracy"]


@pytest.mark.parametrize("damage", ["flipped", "missing", "replaced"])
def test_a_finished_run_whose_params_file_is_damaged_is_an_error_naming_it(
    finished_run, tmp_path, capsys, damage
):
    # the checkpoints are intact: an older (or any) checkpoint never stands in for the final state
    run, config, _ = finished_run
    run = _copy(run, tmp_path)
    path = run / train.PARAMS_FILE
    if damage == "flipped":
        _flip([path])
        fragment = f"{path} is damaged"
    elif damage == "missing":
        path.unlink()
        fragment = f"{path} is missing: the final state of the finished run"
    else:  # another run's intact file (other weights, same model)
        other = train.train(
            _config(**{"config.total_steps": 4, "config.seed": 1}), tmp_path / "other"
        )
        assert (
            other["params_checksum"]
            != json.loads((run / "summary.json").read_text())["params_checksum"]
        )
        path.write_bytes((tmp_path / "other" / train.PARAMS_FILE).read_bytes())
        capsys.readouterr()  # that run's progress
        fragment = f"{path} does not hold the parameters {run / 'summary.json'} records"
    before = _files(run)
    code, err = _cli(capsys, "eval", "--checkpoint", str(run))
    assert code == 1 and fragment in _one_line(err), err
    student = _config(**{"config.total_steps": 1, "config.distill.teacher": str(run)})
    with pytest.raises((ValueError, FileNotFoundError), match=fragment.split(":")[0]):
        train.train(student, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    assert _files(run) == before


def test_arrays_that_load_but_differ_from_what_was_written_are_refused(finished_run, tmp_path):
    # Silent corruption (bytes that still decode, as the issue saw: accuracy 0.108, loss NaN):
    # rewrite step 4 with one array changed under the checksum that was saved with the original.
    import shutil

    import orbax.checkpoint as ocp

    run, config, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as manager:
        restored = manager.restore(4, args=args)
    leaves, treedef = jax.tree_util.tree_flatten(restored.state)
    meta = dict(restored.meta)
    biggest = max(range(len(leaves)), key=lambda i: np.size(leaves[i]))
    leaves[biggest] = np.asarray(leaves[biggest]) + 1.0
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    shutil.rmtree(run / "checkpoints" / "4")
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as manager:
        manager.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
        )
    with pytest.warns(UserWarning, match="step 4 .* do not match the checksum"):
        _, meta, _ = train.restore(run)
    assert meta["step"] == 2
    with pytest.warns(UserWarning, match="step 4 .* checksum"):  # resume skips it, then rewrites it
        assert train.train(config, run, resume=True)["steps"] == 4
    assert train.restore(run)[1]["step"] == 4


def test_checkpoints_without_a_checksum_are_not_read(finished_run, tmp_path):
    # Checkpoints of the versions before checksums and the "tree" layout existed are refused
    # like damaged ones: restore falls back to an older checkpoint, naming why.
    import orbax.checkpoint as ocp

    run, config, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    checkpoints = train.Checkpoints(run / "checkpoints", keep=3)
    template = train.create_train_state(config, total_steps=1, steps_per_epoch=1)
    state, meta = checkpoints._restore(4, template)
    checkpoints.close()
    old_meta = {k: v for k, v in meta.items() if k not in ("layout", "sha256")}
    import shutil

    shutil.rmtree(run / "checkpoints" / "4")
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as manager:
        manager.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(
                    {k: getattr(state, k) for k in ("step", "params", "opt_state", "rng")}
                ),
                meta=ocp.args.JsonSave(old_meta),
            ),
        )
    with pytest.warns(UserWarning, match="step 4 .* has no checksum and layout"):
        _, meta, _ = train.restore(run)
    assert meta["step"] == 2


def test_checkpoints_written_before_they_held_rest_restore_and_resume(finished_run, tmp_path):
    # Until 2026-12-06 a checkpoint held (step, params, opt_state, rng); the model's other
    # variables were constants then, rebuilt from the config. Runs interrupted then (the
    # 30-epoch study's) resume from such a checkpoint to the same result.
    import shutil

    import orbax.checkpoint as ocp

    run, config, summary = finished_run
    run = _interrupted(_copy(run, tmp_path))
    checkpoints = train.Checkpoints(run / "checkpoints", keep=3)
    template = train.create_train_state(config, total_steps=1, steps_per_epoch=1)
    state, meta = checkpoints._restore(2, template)
    checkpoints.close()
    assert meta["parts"] == ["step", "params", "opt_state", "rng", "rest"]
    old = {k: getattr(state, k) for k in ("step", "params", "opt_state", "rng")}
    old_meta = {k: v for k, v in meta.items() if k != "parts"}
    old_meta["sha256"] = train.checkpoints._digest(train.checkpoints._flat(old))
    shutil.rmtree(run / "checkpoints")
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as manager:
        manager.save(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave(old_meta)
            ),
        )
    assert train.restore(run)[1]["step"] == 2
    resumed = train.train(config, run, resume=True)
    assert resumed["steps"] == 4 and resumed["params_checksum"] == summary["params_checksum"]
    # its newest checkpoint, written by the resumed run, holds rest (a finished run reads its
    # params.msgpack: marked unfinished to read the checkpoint)
    assert train.restore(_interrupted(run))[1]["parts"][-1] == "rest"


def test_a_params_file_without_a_checksum_is_not_read(finished_run, tmp_path):
    from flax import serialization

    run, _, _ = finished_run
    run = _copy(run, tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoints")
    path = run / train.PARAMS_FILE
    tree = serialization.msgpack_restore(path.read_bytes())
    del tree["sha256"]
    path.write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(ValueError, match="params.msgpack has no checksum"):
        train.restore(run)


def test_params_file_corruption_is_detected(finished_run, tmp_path):
    run, _, _ = finished_run
    run = _copy(run, tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoints")
    path = run / train.PARAMS_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="params.msgpack is damaged"):
        train.restore(run)


def test_one_process_per_run_directory_and_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from addervit_jax import train
                with train.RunLock(__import__("pathlib").Path({str(run)!r})):
                    print("locked", flush=True)
                    time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(train.RunDirectoryBusy, match=f"in use by process {holder.pid}"):
            train.train(_config(**{"config.total_steps": 1}), run)
        assert not (run / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock must not stay behind
        holder.wait()
    assert train.train(_config(**{"config.total_steps": 1}), run)["status"] == "finished"


def test_resume_checks_the_config_and_the_directory(finished_run, tmp_path):
    run, config, _ = finished_run
    run = _copy(run, tmp_path)
    before = (run / "config.json").read_text()
    other = _config(**{"config.total_steps": 4, "config.checkpoint_every_steps": 2})
    other.variant = "multi"
    with pytest.raises(ValueError, match=r"variant: 'qkv_2ffn' \(run\) != 'multi' \(now\)"):
        train.train(other, run, resume=True)
    assert (run / "config.json").read_text() == before
    # what may change on resume: logging and keeping
    relaxed = _config(**{"config.total_steps": 4, "config.checkpoint_every_steps": 2})
    relaxed.log_every_steps = 2
    assert train.train(relaxed, run, resume=True)["steps"] == 4
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        train.train(config, tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(SystemExit):  # through the CLI: one line, exit 1
        raise SystemExit(cli.main(["train", "--workdir", str(tmp_path / "missing"), "--resume"]))


def test_partial_last_metrics_line_is_dropped_on_resume(finished_run, tmp_path):
    run, config, _ = finished_run
    run = _interrupted(_copy(run, tmp_path))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # a kill during a write
    (run / "curves.png").unlink()
    with pytest.warns(UserWarning, match="dropped a partial last line"):
        train.train(config, run, resume=True)
    assert (run / "metrics.jsonl").read_text().endswith("\n")
    assert all(r["step"] <= 4 for r in logs.read_metrics(run))
    assert (run / "curves.png").exists()
    # a damaged line anywhere else is named by file and line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        logs.read_metrics(run)


def test_truncated_native_kernel_in_the_cache_is_rebuilt(tmp_path):
    script = textwrap.dedent("""
        import warnings, numpy as np
        from addervit_jax import ops
        from addervit_jax.kernels import cpu_native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_native.available(), cpu_native.unavailable_reason
        x = np.ones((3, 4), np.float32)
        y = ops.adder(x, np.zeros((4, 2), np.float32), backend="cpu_native")
        print("OK", float(y.sum()), [str(w.message) for w in caught])
    """)
    env = {**os.environ, "ADDERVIT_CACHE_DIR": str(tmp_path)}

    def run():
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    assert "OK -24.0 []" in run()
    (library,) = tmp_path.glob("cpu_native-*.so")
    library.write_bytes(library.read_bytes()[:4096])  # cut short
    out = run()
    assert "OK -24.0" in out and "does not match its recorded checksum" in out
    assert "OK -24.0 []" in run()  # rebuilt once, whole again
    # cut short with a checksum recorded again after the damage: loading it would end in SIGBUS
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 2])  # the old code died here with SIGBUS (rc 135)
    library.with_suffix(".sha256").write_text(hashlib.sha256(library.read_bytes()).hexdigest())
    out = run()
    assert "OK -24.0" in out and "is cut short" in out and "although its checksum matches" in out
    assert "OK -24.0 []" in run()


def test_elf_shortfall_names_what_a_cut_library_lacks():
    whole = pathlib.Path(sys.executable).resolve().read_bytes()
    assert cpu_native._elf_shortfall(whole) is None
    assert cpu_native._elf_shortfall(b"library") is None  # not ELF: not checked
    assert "not even a whole ELF header" in cpu_native._elf_shortfall(whole[:40])
    for cut in (100, len(whole) // 2, len(whole) - 1):
        message = cpu_native._elf_shortfall(whole[:cut])
        assert message.startswith(f"{cut} of the ") and "bytes its" in message


@pytest.mark.parametrize("backend", ["cpu_native", "xla", "auto"])
def test_float64_is_computed_in_float64(backend):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 9)) + 1e6
    w = rng.normal(size=(9, 4)) + 1e6
    q, k = rng.normal(size=(5, 7)) + 1e6, rng.normal(size=(3, 7)) + 1e6
    with jax.enable_x64():
        y = ops.adder(jnp.asarray(x), jnp.asarray(w), backend=backend)
        s = ops.adder_scores(jnp.asarray(q), jnp.asarray(k), backend=backend)
        assert y.dtype == jnp.float64 and s.dtype == jnp.float64
    expected = -np.abs(x[:, :, None] - w[None]).sum(1)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(s), -np.abs(q[:, None] - k[None]).sum(-1), rtol=1e-13)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"depth": 0}, "depth=0 must be a positive integer"),
        ({"depth": -1}, "depth=-1 must be a positive integer"),
        ({"depth": 2.5}, "depth=2.5 must be a positive integer"),
        ({"image_size": 0}, "image_size=0 must be a positive integer"),
        ({"heads": 0}, "heads=0 must be a positive integer"),
        ({"heads": "4"}, "heads='4' must be a positive integer"),
        ({"patch_size": 0}, "patch_size=0 must be a positive integer"),
    ],
)
def test_model_sizes_are_checked_by_name(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        models.build("qkv_2ffn", rngs=nnx.Rngs(0), **overrides)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"config.log_every_steps": 0}, "log_every_steps=0 must be positive"),
        ({"config.keep_checkpoints": 0}, "keep_checkpoints=0 must be positive"),
        ({"config.total_steps": -5}, "total_steps=-5 must be 0"),
        ({"config.batch_size": 2000}, "batch_size=2000 is larger than the 1437 training"),
        ({"config.eval_split": "nosuch"}, "bad split 'nosuch'"),
        ({"config.model.norm": "bogus"}, "model: AdderDense: unknown norm='bogus'"),
        ({"config.model.nosuch": 1}, r"has no field\(s\) \['nosuch'\]; fields: \['attn'"),
        ({"config.model.grad": "bogus"}, "grad"),
        ({"config.distill.teacher": "/nonexistent"}, "distill.teacher='/nonexistent' is not a"),
        ({"config.init_from": "/nonexistent"}, "init_from='/nonexistent' is not a finished"),
    ],
)
def test_bad_training_configs_fail_before_the_run_directory_exists(tmp_path, overrides, fragment):
    with pytest.raises((ValueError, FileNotFoundError), match=fragment):
        train.train(_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_errors_are_one_line(finished_run, tmp_path, capsys):
    def train_fails(*args, fragment):
        with pytest.raises(SystemExit) as info:
            raise SystemExit(cli.main(["train", *args]))
        message = str(info.value.code) if not isinstance(info.value.code, int) else ""
        message += capsys.readouterr().err
        assert fragment in message, message
        assert "Traceback" not in message and message.strip().count("\n") == 0, message

    train_fails("--config", "nosuchconfig", fragment="neither a file nor")
    no_function = tmp_path / "no_function.py"
    no_function.write_text("X = 1\n")
    train_fails("--config", str(no_function), fragment="has no get_config() function")
    for body, kind in (("return None", "NoneType"), ("return {'variant': 'multi'}", "dict")):
        returns = tmp_path / f"returns_{kind}.py"
        returns.write_text(f"def get_config():\n    {body}\n")
        train_fails("--config", str(returns), fragment=f"get_config() returned {kind}")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    train_fails("--workdir", str(a_file / "run"), "--config.total_steps=1", fragment="--workdir")

    def eval_fails(*args, fragment):
        code = None
        try:
            code = cli.main(["eval", *args])
        except SystemExit as err:  # argparse errors
            code = err.code
        assert code not in (0, None)
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err

    eval_fails("--checkpoint", str(tmp_path / "nowhere"), fragment="no config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(_config().to_json_best_effort())
    eval_fails("--checkpoint", str(empty), fragment="no restorable checkpoint")
    for size in ("-4", "0"):
        eval_fails("--checkpoint", str(empty), "--batch-size", size, fragment="--batch-size")
    eval_fails("--checkpoint", str(finished_run[0]), "--split", "nosuch", fragment="bad split")


# Issue 35: nothing overwritten, nothing nonsensical accepted. Each refusal is one line, before
# the run directory exists; the CLI returns 1 for a refused run and argparse's 2 for a bad flag.

TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


def _cli(capsys, *argv) -> tuple[int, str]:
    """The exit code and stderr of ``addervit ARGV`` (argparse's and absl's exits included)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        code, err = 1, err + code
    return code, err.strip()


def _one_line(err: str) -> str:
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _strict(name):
    raise ValueError(f"not strict JSON: {name}")


def _files(run: pathlib.Path) -> dict[str, bytes]:
    """The bytes of a run's files (not the lock, which each process that locks it rewrites)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_an_empty_workdir_is_refused_not_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, "train", "--workdir=", "--config.total_steps=1")
    assert code == 1 and "workdir='' is empty" in _one_line(err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="workdir='' is empty"):
        train.train(_config(), "")


def test_a_run_without_checkpoints_is_never_overwritten_and_overwrite_moves_it_aside(
    finished_run, tmp_path, capsys
):
    import shutil

    run = _copy(finished_run[0], tmp_path)
    shutil.rmtree(run / "checkpoints")  # the params-only layout a repository keeps of a run
    before = _files(run)
    with pytest.raises(FileExistsError, match=r"holds a run \(config.json, params.msgpack, sum"):
        train.train(_config(**{"config.total_steps": 1}), run)
    code, err = _cli(capsys, "train", "--workdir", str(run), *TINY_FLAGS, "--config.total_steps=1")
    assert code == 1 and "already holds a run" in _one_line(err) and "--overwrite" in err
    code, err = _cli(capsys, "train", "--workdir", str(run), "--resume", "--overwrite")
    assert code == 1 and "cannot be combined with resume=True" in _one_line(err)
    assert _files(run) == before
    # --overwrite: the old run moves, whole, to a sibling; the new one starts in an empty folder
    flags = [*TINY_FLAGS, "--config.total_steps=1"]
    assert _cli(capsys, "train", "--workdir", str(run), "--overwrite", *flags)[0] == 0
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _files(aside) == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert [(r["split"], r["step"]) for r in logs.read_metrics(run)] == [("train", 1), ("eval", 1)]
    # overwrite=True where there is no run: a plain new run, nothing moved
    assert train.train(_config(**{"config.total_steps": 1}), tmp_path / "new", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run", aside.name]


def test_resume_of_a_finished_run_reads_it_back_and_writes_nothing(finished_run, tmp_path, capsys):
    run, config, _ = finished_run
    run = _copy(run, tmp_path)
    before = _files(run)
    assert train.train(config, run, resume=True) == json.loads((run / "summary.json").read_text())
    flags = [*TINY_FLAGS, "--config.total_steps=4", "--config.checkpoint_every_steps=2"]
    assert _cli(capsys, "train", "--workdir", str(run), "--resume", *flags)[0] == 0
    assert _files(run) == before  # no second final evaluation in metrics.jsonl


@pytest.mark.parametrize("where", ["parameters", "evaluation"])
def test_a_model_that_is_not_finite_is_never_saved_nor_finished(
    where, tmp_path, monkeypatch, capsys
):
    import math

    from addervit_jax import optim
    from addervit_jax.train import loop

    if where == "parameters":
        make_schedule = optim.make_schedule

        def nan_at_the_last_step(**kwargs):
            # the last update makes the model NaN behind a finite loss (what
            # end_lr_fraction=nan did before validate_config refused it)
            schedule = make_schedule(**kwargs)
            last = kwargs["total_steps"] - 1
            return lambda count: jnp.where(count >= last, jnp.nan, schedule(count))

        monkeypatch.setattr(optim, "make_schedule", nan_at_the_last_step)
        problem = "the parameters or optimiser state became non-finite by step 3"
    else:
        evaluate = loop.evaluate
        monkeypatch.setattr(
            loop, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "loss": math.inf}
        )
        problem = "the evaluation loss became inf by step 3"
    run = tmp_path / "run"
    flags = [*TINY_FLAGS, "--config.total_steps=3", "--config.checkpoint_every_steps=2"]
    code, err = _cli(capsys, "train", "--workdir", str(run), *flags)
    message = err.splitlines()[-1]  # after the progress bar
    assert code == 1 and message.startswith("addervit train: " + problem), err
    assert "the last good checkpoint, step 2, is kept" in message
    assert "the state of step 3 was not saved" in message
    assert _steps(run) == [2] and not (run / train.PARAMS_FILE).exists()
    summary = json.loads((run / "summary.json").read_text(), parse_constant=_strict)
    assert summary["status"] == "diverged" and summary["steps"] == 3
    assert summary["last_good_step"] == 2 and "eval_accuracy" not in summary
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_strict)
    state, meta, _ = train.restore(run)  # what a reader gets: the last good model
    assert meta["step"] == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_metrics_and_summaries_are_strict_json(tmp_path):
    import math

    log = logs.RunLog(tmp_path, total_steps=2, start_step=0)
    log.train(1, {"loss": np.float32("nan"), "accuracy": 0.5}, images_per_second=math.inf)
    log.eval(2, {"accuracy": 0.5, "loss": math.nan, "count": 3})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line, parse_constant=_strict) for line in lines)
    assert first["loss"] is None and first["images_per_second"] is None and first["accuracy"] == 0.5
    assert second["loss"] is None and second["accuracy"] == 0.5
    logs.write_summary(tmp_path, {"eval_loss": math.nan, "curve": [-math.inf, 1.0]})
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_strict)
    assert summary == {"eval_loss": None, "curve": [None, 1.0]}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"config.label_smoothing": 2.0}, "label_smoothing=2.0 must be a finite number in [0, 1)"),
        ({"config.label_smoothing": -1.0}, "label_smoothing=-1.0 must be a finite number in"),
        ({"config.weight_decay": -5.0}, "weight_decay=-5.0 must be a finite number >= 0"),
        ({"config.warmup_epochs": -1.0}, "warmup_epochs=-1.0 must be a finite number >= 0"),
        ({"config.warmup_epochs": float("nan")}, "warmup_epochs=nan must be a finite number"),
        ({"config.grad_clip": -1.0}, "grad_clip=-1.0 must be a finite number >= 0 (0: no clip"),
        ({"config.grad_clip": float("nan")}, "grad_clip=nan must be a finite number >= 0"),
        ({"config.learning_rate": float("inf")}, "learning_rate=inf must be a finite number > 0"),
        ({"config.num_epochs": float("inf")}, "num_epochs=inf must be a finite number > 0"),
        ({"config.end_lr_fraction": float("nan")}, "end_lr_fraction=nan must be a finite number"),
        ({"config.end_lr_fraction": 1.5}, "end_lr_fraction=1.5 must be a finite number in [0, 1]"),
        ({"config.adaptive_eta": 0.0}, "adaptive_eta=0.0 must be a finite number > 0"),
        ({"config.momentum": 1.0}, "momentum=1.0 must be a finite number in [0, 1)"),
        ({"config.momentum": float("nan")}, "momentum=nan must be a finite number in [0, 1)"),
        ({"config.crop_padding": -1}, "crop_padding=-1 must be an integer >= 0"),
        ({"config.seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"config.distill.temperature": float("inf")}, "distill.temperature=inf must be a finite"),
        ({"config.distill.weight": float("nan")}, "distill.weight=nan must be a finite number"),
        ({"config.model.num_classes": 5}, "model.num_classes=5 but digits has 10 classes"),
        ({"config.model.channels": 3}, "model.channels=3 but digits has 1 image channels"),
        ({"config.model.image_size": 16}, "model.image_size=16 but the digits images are 8 px"),
        ({"config.eval_split": "train[0:0]"}, "eval_split='train[0:0]' selects no examples"),
        ({"config.train_split": "train[0:0]"}, "train_split='train[0:0]' selects no examples"),
        ({"config.eval_split": ""}, "eval_split='' must name a split"),
    ],
)
def test_nonsensical_numbers_and_models_are_refused_before_the_run_directory_exists(
    tmp_path, overrides, fragment
):
    with pytest.raises(ValueError) as info:
        train.train(_config(**overrides), tmp_path / "run")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_model_of_another_dataset_is_refused_through_every_door(tmp_path, capsys):
    five = tmp_path / "five_classes.py"
    five.write_text(
        "from addervit_jax.configs import digits\n\n\ndef get_config():\n"
        "    c = digits.get_config()\n    c.model.num_classes = 5\n    return c\n"
    )
    code, err = _cli(capsys, "train", "--config", str(five), "--workdir", str(tmp_path / "run"))
    assert code == 1 and "model.num_classes=5 but digits has 10 classes" in _one_line(err)
    config = configs.override(_config(), {"model.num_classes": 5})  # the experiments' --set
    with pytest.raises(ValueError, match="model.num_classes=5 but digits has 10 classes"):
        train.validate_config(config)
    assert not (tmp_path / "run").exists()


def test_eval_refuses_empty_splits_huge_batches_and_repeated_calibration(
    finished_run, tmp_path, capsys
):
    run = finished_run[0]
    before = _files(run)
    for args, expected, fragment in (
        (["--split", "train[0:0]"], 1, "eval_split='train[0:0]' selects no examples of digits"),
        (["--split", ""], 2, "--split is empty"),
        (["--calibration-batches", "8"], 2, "--calibration-batches calibrates the int8 form: add"),
        (["--kinds", "adder"], 2, "--kinds chooses the sites of the int8 form: add --int8"),
        (["--int8", "--kinds", "nosuch"], 2, "argument --kinds: invalid choice: 'nosuch'"),
        (
            ["--int8", "--calibration-batches", "0"],
            2,
            "argument --calibration-batches: must be a positive integer, got 0",
        ),
        (
            ["--batch-size", "100000"],
            1,
            "batch_size=100000 is larger than the 360 examples of digits 'test'; use at most 360",
        ),
        (
            ["--int8", "--calibration-batches", "100"],
            1,
            "calibration_batches=100 of 32 images (3200) would repeat the 1437 training examples "
            "of digits 'train'; use at most 44",
        ),
    ):
        code, err = _cli(capsys, "eval", "--checkpoint", str(run), *args)
        assert code == expected and fragment in err.splitlines()[-1], (args, err)
        assert "Traceback" not in err
    assert _files(run) == before
    damaged = _copy(run, tmp_path)
    (damaged / "config.json").write_text('{"variant": "qkv_2ffn",')  # cut short
    code, err = _cli(capsys, "eval", "--checkpoint", str(damaged))
    assert code == 1 and f"{damaged / 'config.json'} is damaged: not JSON" in _one_line(err)
    with pytest.raises(ValueError, match="config.json is damaged: not JSON"):
        train.train(finished_run[1], damaged, resume=True)


def test_a_teacher_with_a_damaged_summary_or_an_unknown_variant_is_named(finished_run, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(finished_run[0], teacher)
    student = _config(**{"config.total_steps": 1, "config.distill.teacher": str(teacher)})
    summary = (teacher / "summary.json").read_text()
    (teacher / "summary.json").write_text(summary[: len(summary) // 2])
    with pytest.raises(ValueError, match=r"teacher/summary.json is damaged: not JSON"):
        train.train(student, tmp_path / "student")
    (teacher / "summary.json").write_text(summary)
    saved = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**saved, "variant": "nosuch"}))
    with pytest.raises(ValueError, match=r"the teacher's .*config.json names variant 'nosuch'"):
        train.train(student, tmp_path / "student")
    assert not (tmp_path / "student").exists()


def test_a_config_file_that_is_not_python_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    code, err = _cli(capsys, "train", "--config", str(tmp_path / "run.json"))
    assert code == 1 and "run.json is not a Python file (.py)" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_models_refuse_integer_images():
    model = models.build(
        "qkv_2ffn",
        rngs=nnx.Rngs(0),
        image_size=8,
        channels=1,
        patch_size=2,
        dim=16,
        depth=1,
        heads=2,
        dim_head=8,
        mlp_dim=32,
        num_classes=10,
    )
    images = jnp.zeros((2, 8, 8, 1), jnp.uint8)
    with pytest.raises(ValueError, match="expected float images, got uint8: preprocess them"):
        model(images)
    assert model(images.astype(jnp.float32)).shape == (2, 10)


def test_cli_numbers_and_output_folders_are_checked_before_any_work(tmp_path, capsys):
    for flag, value in (("--tokens", "-1"), ("--tokens", "0"), ("--features", "0")):
        code, err = _cli(capsys, "demo", flag, value)
        assert code == 2 and f"argument {flag}: must be a positive integer, got {value}" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = _cli(capsys, "check-kernels", "--sass", "--out", str(a_file))
    assert code == 2 and f"--out {a_file}: is a file, not a directory" in err  # not after a sweep
    code, err = _cli(capsys, "check-kernels", "--out", str(tmp_path / "sass"))
    assert code == 2 and "--out is for --sass" in err
    code, err = _cli(capsys, "check-kernels", "--sass", "--shapes", "8x8x8", "--dtype", "float32")
    assert code == 2 and "--shapes, --dtype are for the comparison against XLA" in err
    assert a_file.read_text() == "" and not (tmp_path / "sass").exists()


@pytest.mark.parametrize("field", ["distill.teacher", "init_from"])
def test_a_teacher_or_source_replaced_before_a_resume_is_refused(tmp_path, field):
    import shutil

    source = tmp_path / "source"
    train.train(_config(**{"config.variant": "multi", "config.total_steps": 3}), source)
    other = tmp_path / "other"  # the same model, other weights
    train.train(
        _config(**{"config.variant": "multi", "config.total_steps": 3, "config.seed": 1}), other
    )
    options = {"config.total_steps": 2, "config.checkpoint_every_steps": 1}
    if field == "init_from":
        options.update({"config.init_fit_steps": 2, "config.init_fit_batches": 1})
    config = _config(**{f"config.{field}": str(source), **options})
    run = tmp_path / "run"
    train.train(config, run)
    record = "teacher.json" if field == "distill.teacher" else "conversion.json"
    recorded = json.loads((run / record).read_text())
    wanted = json.loads((source / "summary.json").read_text())["params_checksum"]
    key = "params_checksum" if record == "teacher.json" else "source_params_checksum"
    assert recorded[key] == wanted
    _interrupted(run)
    shutil.rmtree(source)
    shutil.copytree(other, source)  # replaced between the interruption and the resume
    before = _files(run)
    with pytest.raises(ValueError, match=rf"{field}=.* changed since this run started: .*{record}"):
        train.train(config, run, resume=True)
    assert _files(run) == before


def test_every_model_field_can_be_set_from_the_command_line(tmp_path, capsys):
    # fields the recipe does not list (norm, grad, num_classes) are model options all the same
    flags = ["--config.model.norm=batch", "--config.model.grad", "clip", "--config.model.dim=16"]
    config = cli._parse_train_flags(flags).config
    assert (config.model.norm, config.model.grad, config.model.dim) == ("batch", "clip", 16)
    # an unknown one is refused with the valid ones, before the run directory exists
    run = tmp_path / "run"
    code, err = _cli(capsys, "train", "--workdir", str(run), "--config.model.nosuch=1")
    line = _one_line(err)
    assert code == 1 and "has no field(s) ['nosuch']; fields: ['attn'" in line and "'norm'" in line
    assert not run.exists()


def test_a_conversion_fit_on_more_than_an_epoch_is_refused_and_a_long_warmup_named(tmp_path):
    source = tmp_path / "source"
    train.train(_config(**{"config.variant": "multi", "config.total_steps": 2}), source)
    config = _config(**{"config.init_from": str(source), "config.init_fit_batches": 100000})
    with pytest.raises(ValueError, match=r"init_fit_batches=100000 is more than the \d+ batches"):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config = _config(**{"config.num_epochs": 1, "config.warmup_epochs": 5})
    with pytest.warns(UserWarning, match=r"warmup_epochs=5 \(\d+ steps\) is not shorter than the"):
        train.check_inputs(config, train.make_inputs(config))


def test_a_damaged_conversion_source_or_a_bad_model_option_is_refused_before_the_run_dir(
    tmp_path, capsys
):
    source = tmp_path / "source"
    train.train(_config(**{"config.variant": "multi", "config.total_steps": 2}), source)
    raw = bytearray((source / train.PARAMS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (source / train.PARAMS_FILE).write_bytes(bytes(raw))
    run = tmp_path / "run"
    config = _config(**{"config.init_from": str(source), "config.init_fit_batches": 1})
    with pytest.raises(ValueError, match=r"init_from=.*source.*params.msgpack is damaged"):
        train.train(config, run)
    assert not run.exists()
    capsys.readouterr()  # the source's training
    config_file = tmp_path / "bogus.py"
    config_file.write_text(
        "from addervit_jax.configs import digits\n\n\ndef get_config():\n"
        "    c = digits.get_config()\n    c.model.norm = 'bogus'\n    return c\n"
    )
    code, err = _cli(capsys, "train", "--config", str(config_file), "--workdir", str(run))
    assert code == 1 and "model: AdderDense: unknown norm='bogus'" in _one_line(err)
    assert not run.exists()


def test_a_kill_right_after_a_checkpoint_loses_no_evaluation(tmp_path, monkeypatch):
    class Killed(BaseException):
        """Stands for a SIGKILL right after a checkpoint was committed."""

    save = train.Checkpoints.save

    def save_then_die(self, state, **meta):
        save(self, state, **meta)
        self.wait()
        if int(state.step) == 2:
            raise Killed

    config = _config(
        **{
            "config.total_steps": 4,
            "config.eval_every_steps": 1,
            "config.checkpoint_every_steps": 2,
        }
    )
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train.Checkpoints, "save", save_then_die)
        with pytest.raises(Killed):
            train.train(config, run)
    assert _steps(run) == [2]
    train.train(config, run, resume=True)
    evaluated = [r["step"] for r in logs.read_metrics(run) if r["split"] == "eval"]
    assert evaluated == [1, 2, 3, 4]


def test_a_stop_signal_during_the_conversion_fit_says_what_happened_and_how_to_resume(tmp_path):
    import time

    source = tmp_path / "source"
    train.train(_config(**{"config.variant": "multi", "config.total_steps": 2}), source)
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    flags += [f"--config.init_from={source}", "--config.init_fit_steps=10000000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "addervit_jax.cli", "train", f"--workdir={run}", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # the conversion says when it starts fitting
        if line.startswith("converting init_from="):
            break
    time.sleep(1)  # into the fit
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 128 + signal.SIGTERM, err
    assert last.startswith("addervit train: interrupted by SIGTERM while converting init_from")
    assert f"--workdir {run} --resume" in last
    assert "Traceback" not in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_the_pallas_backend_on_a_cpu_without_interpret_is_refused_in_one_line():
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU property")
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"backend='pallas' compiles for a GPU; on a CPU .*"):
        ops.adder(x, w, backend="pallas")
    assert ops.adder(x, w, backend="pallas", interpret=True).shape == (2, 4)
