"""notebooks/quickstart.ipynb, executed as CI runs it (nbclient, a kernel on this interpreter), checked by
its outputs: the trials table, the report's plots and the inference with the best adapter."""
import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
TRAIN = REPO / "examples" / "data" / "stdlib_docstrings" / "train.jsonl"
KERNEL = "peft-search-quickstart-test"


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    tags = {tag for cell in code for tag in cell.metadata.get("tags", [])}
    assert {"spec", "trials", "plots", "inference"} <= tags   # what the executed test looks for


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run top to bottom in a kernel on this venv's Python, from notebooks/ as Jupyter would."""
    root = tmp_path_factory.mktemp("notebook")
    # A kernelspec for sys.executable in a private JUPYTER_PATH: the kernel runs this venv, whatever
    # kernels the machine has registered.
    spec_dir = root / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "peft-search test kernel", "language": "python"}))
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
        patch.setenv("QUICKSTART_RUNS_DIR", str(runs))   # the notebook's temporary directory, under tmp_path
        patch.setenv("WANDB_MODE", "disabled")
        nb = nbformat.read(str(NOTEBOOK), as_version=4)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as error:
            pytest.fail(f"a notebook cell failed:\n{str(error)[-4000:]}")
    return nb, runs


def tagged(nb, tag):
    cells = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def spec_trials(nb) -> int:
    match = re.search(r"is valid: (\d+) trials", stream_text(tagged(nb, "spec")))
    assert match, stream_text(tagged(nb, "spec"))
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_no_cell_has_an_error_output(executed):
    nb, _ = executed
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trials_table_has_a_row_per_trial_of_the_spec(executed):
    nb, runs = executed
    trials = spec_trials(nb)
    assert trials >= 2
    cell = tagged(nb, "trials")
    html = [out.data["text/html"] for out in cell.outputs
            if out.output_type == "execute_result" and "text/html" in out.get("data", {})]
    assert html, "the trials cell shows no DataFrame"
    body = re.search(r"<tbody>(.*?)</tbody>", html[0], re.S)
    assert body and body.group(1).count("<tr") == trials
    assert re.search(rf"^{trials} trials: ", stream_text(cell), re.M)
    # the run directory went where the test told the notebook, not into the checkout
    assert (runs / "runs" / "quickstart-notebook" / "best" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_plots_are_displayed_inline(executed):
    nb, _ = executed
    cell = tagged(nb, "plots")
    svgs = [out.data["image/svg+xml"] for out in cell.outputs
            if out.output_type == "display_data" and "image/svg+xml" in out.get("data", {})]
    assert svgs, "no SVG plot was displayed"
    assert all("<svg" in svg and 'xmlns="http://www.w3.org/2000/svg"' in svg for svg in svgs)
    match = re.search(r"(\d+) plot\(s\) in report.html", stream_text(cell))
    assert match and int(match.group(1)) == len(svgs)
    report = tagged(nb, "report")
    assert any("## Best trial" in out.get("data", {}).get("text/markdown", "") for out in report.outputs)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_inference_prints_a_known_label_for_each_docstring(executed):
    nb, _ = executed
    labels = {str(json.loads(line)["label"]) for line in TRAIN.read_text().splitlines() if line.strip()}
    text = stream_text(tagged(nb, "inference"))
    count = re.search(r"classifying (\d+) docstrings", text)
    assert count, text
    predicted = re.findall(r"^predicted: (\S+) \(p=([0-9.]+)\) <- ", text, re.M)
    assert len(predicted) == int(count.group(1)) >= 2, text
    for label, probability in predicted:
        assert label in labels, (label, labels)
        assert 1 / len(labels) <= float(probability) <= 1.0   # the argmax of a softmax over the labels
