"""Run folders: config with versions and device, atomic results, tensors without pickle, offline figures."""
import json

import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import load_file

from probes.runs import Run


def test_run_folder_contents(tmp_path):
    run = Run("demo", "toy", {"seed": 3, "n": 2}, out=tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["seed"] == 3 and config["experiment"] == "demo" and "torch" in config["versions"]
    assert "cuda" in config["device"]
    run.update(a=torch.tensor([1.0, 2.0]), b={"x": 1})
    run.update(c=0.5)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"a": [1.0, 2.0], "b": {"x": 1}, "c": 0.5}
    run.save_tensors("t", {"v": torch.arange(3.0)}, {"layer": 2})
    assert torch.equal(load_file(str(tmp_path / "run" / "t.safetensors"))["v"], torch.arange(3.0))
    run.save_figure("f", go.Figure(go.Scatter(y=[1, 2])))
    html = (tmp_path / "run" / "f.html").read_text()
    assert (tmp_path / "run" / "plotly.min.js").exists() and 'src="plotly.min.js"' in html
    assert "cdn.plot.ly" not in html


def test_non_finite_results_are_refused(tmp_path):
    run = Run("demo", "toy", {}, out=tmp_path)
    run.update(ok=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        run.update(bad=float("nan"))
    # What was written before survives the refused update.
    assert json.loads((tmp_path / "results.json").read_text()) == {"ok": 1.0}
