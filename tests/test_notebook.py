"""experiments/quickstart.ipynb runs top to bottom on CPU and its short training run learns."""

import pathlib
import re
import sys

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"
KERNEL = "addervit-test"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_quickstart_runs_and_trains(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A kernel spec of this interpreter, so the notebook runs in the test's environment whatever
    # kernels the machine has installed (no `ipykernel install` needed).
    write_kernel_spec(tmp_path / "kernels" / KERNEL)
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = NotebookClient(
        nb,
        km=km,
        timeout=600,  # per cell; the training cell takes about a minute on 2 CPU cores
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    text = _outputs_text(nb)
    assert "addervit_jax is already installed: nothing to do" in text  # the install cell's skip
    assert sys.executable in text  # the install check ran in this interpreter
    assert "running on CPU" in text
    assert "relative error vs float64 broadcast" in text
    assert text.count("dL/dx error") == 3
    accuracy = float(re.search(r"final eval accuracy: ([0-9.]+)", text).group(1))
    assert accuracy > 0.5, accuracy
    plots = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(plots) == 1  # the curves
