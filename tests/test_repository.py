"""The README's commands, CI and the CLI agree with each other."""

import pathlib
import re

from addervit_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_main_and_test_commands():
    main_cmd, test_cmd = _readme_commands()
    assert main_cmd.endswith("addervit train")
    assert "pytest" in test_cmd


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines


def test_demo_runs(capsys):
    assert cli.main(["demo", "--tokens", "16", "--features", "8"]) == 0
    out = capsys.readouterr().out
    assert "grad='clipped'" in out
    error = float(re.search(r"relative error (\S+)", out).group(1))
    assert error < 1e-5


def test_wheel_ships_the_configs_and_the_kernel_sources(tmp_path):
    # kernels/ is mapped to addervit_jax.kernels and cpu_native.cc is package data: a regular
    # (non-editable) install must carry both, or `addervit train --config cifar10` and the
    # native CPU kernel would only work from a checkout.
    import subprocess
    import sys
    import zipfile

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("addervit_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "addervit_jax/configs/cifar10.py",
        "addervit_jax/adder/op.py",
        "addervit_jax/adder/backends/xla.py",
        "addervit_jax/data/order.py",
        "addervit_jax/kernels/adder_pallas.py",
        "addervit_jax/kernels/cpu_native.py",
        "addervit_jax/kernels/cpu_native.cc",
        "addervit_jax/models/int8.py",
        "addervit_jax/train/loop.py",
    ):
        assert name in names, name
