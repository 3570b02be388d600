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
