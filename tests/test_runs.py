"""Run folders: atomic (partial folder moved into place), never mixed, locked, validated; provenance in config."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import load_file

import tiny
from probes.runs import Run, RunFolderError, is_complete, load_run


def _run(out, **kw):
    return Run("demo", "toy", {"seed": 3}, out=out, **kw)


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    with _run(out) as run:
        assert run.dir != out and not out.exists()  # nothing appears under the real name before completion
        run.update(a=torch.tensor([1.0, 2.0]), b={"x": 1})
        run.update(c=0.5)
        run.save_tensors("t", {"v": torch.arange(3.0)}, {"layer": 2})
        run.save_figure("f", go.Figure(go.Scatter(y=[1, 2])))
    assert run.dir == out and is_complete(out)
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["experiment"] == "demo" and "torch" in config["versions"]
    assert "cuda" in config["device"] and config["argv"] == sys.argv
    assert json.loads((out / "results.json").read_text()) == {"a": [1.0, 2.0], "b": {"x": 1}, "c": 0.5}
    assert torch.equal(load_file(str(out / "t.safetensors"))["v"], torch.arange(3.0))
    html = (out / "f.html").read_text()
    # Self-contained: plotly.js is inside the file (a copy elsewhere still draws), nothing loads from a CDN.
    assert not (out / "plotly.min.js").exists() and not re.search(r"<script[^>]*\bsrc=", html)
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html
    index = (out / "index.html").read_text()
    assert 'src="f.html"' in index and "<code>0.5</code>" in index and "demo" in index
    marker = load_run(out)["marker"]
    assert marker["status"] == "complete" and set(marker["files"]) >= {"config.json", "results.json", "t.safetensors"}


def test_non_finite_results_are_refused(tmp_path):
    with _run(tmp_path / "r") as run:
        run.update(ok=1.0)
        with pytest.raises(ValueError, match="non-finite"):
            run.update(bad=float("nan"))
        # What was written before survives the refused update.
        assert json.loads((run.dir / "results.json").read_text()) == {"ok": 1.0}


def test_rerun_refuses_overwrite_replaces_whole(tmp_path):
    out = tmp_path / "r"
    with _run(out) as run:
        run.update(layer=1)
        run.save_tensors("old_only", {"v": torch.zeros(1)})
    with pytest.raises(RunFolderError, match="already holds a run.*--overwrite"):
        _run(out)
    assert json.loads((out / "results.json").read_text()) == {"layer": 1}
    with _run(out, mode="overwrite") as run:
        run.update(layer=3)
        assert json.loads((out / "results.json").read_text()) == {"layer": 1}  # old run intact until complete
    assert json.loads((out / "results.json").read_text()) == {"layer": 3}
    assert not (out / "old_only.safetensors").exists()  # replaced whole, not merged


def test_interrupted_run_leaves_previous_run_untouched(tmp_path):
    out = tmp_path / "r"
    with _run(out) as run:
        run.update(layer=1)
        run.save_figure("sweep", go.Figure())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with _run(out, mode="overwrite") as run:
            run.update(layer=3)
            raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    partial = tmp_path / ".r.partial"
    assert json.loads((partial / "run.json").read_text())["status"] == "interrupted"
    with pytest.raises(RunFolderError, match="interrupted run.*--resume"):
        _run(out)
    _run(tmp_path / "done").finish()
    with pytest.raises(RunFolderError, match="is complete and there is no interrupted run"):
        _run(tmp_path / "done", mode="resume")


def test_failed_run_is_marked_and_resumable(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ZeroDivisionError):
        with _run(out) as run:
            run.chunks.put("k", {"x": torch.ones(2)})
            1 / 0
    marker = json.loads((tmp_path / ".r.partial" / "run.json").read_text())
    assert marker["status"] == "failed" and "ZeroDivisionError" in marker["error"]
    with _run(out, mode="resume") as run:
        assert run.resumed and torch.equal(run.chunks.get("k")["x"], torch.ones(2))
    assert is_complete(out) and not (out / "chunks").exists()  # resume scratch does not stay in the result


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "r"
    with _run(out):
        with pytest.raises(RunFolderError, match="another run is writing"):
            _run(out, mode="overwrite")
        # And from another process (flock is per open file, so this is what two shells would see).
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                f"from probes.runs import Run, RunFolderError\n"
                f"try:\n    Run('demo', 'toy', {{}}, out={str(out)!r}, mode='overwrite')\n"
                f"except RunFolderError as e:\n    print('refused:', e)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "refused: another run is writing" in res.stdout, res.stderr
    with _run(out, mode="overwrite"):  # released once the first run is done
        pass


def test_folder_that_is_not_a_run_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(RunFolderError, match="not a run folder"):
            _run(tmp_path / "mine", mode=mode)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_run_detects_changed_files(tmp_path):
    with _run(tmp_path / "r") as run:
        run.update(x=1)
    load_run(tmp_path / "r")
    (tmp_path / "r" / "results.json").write_text('{"x": 2}')
    with pytest.raises(RunFolderError, match="results.json: sha256 differs"):
        load_run(tmp_path / "r")


def test_bad_prompt_file_fails_before_models_load_and_old_run_survives(tmp_path, monkeypatch):
    exp = tiny.load_experiment("logit_lens")
    out = tmp_path / "lens"
    with _run(out) as run:
        run.update(old=True)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    import probes.pairs

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(probes.pairs, "load_pair", no_load)
    for argv in (["--prompts", str(bad), "--out", str(out), "--overwrite"],
                 ["--prompts", str(tmp_path / "missing.csv"), "--out", str(out), "--overwrite"],
                 ["--base", str(tmp_path), "--instruct", str(tmp_path), "--out", str(tmp_path / "x")],
                 ["--pair", "no-such-pair", "--out", str(tmp_path / "y")],
                 ["--out", str(out)]):
        with pytest.raises((SystemExit, ValueError, OSError)):
            exp.main(argv)
    assert json.loads((out / "results.json").read_text()) == {"old": True}
    assert not (tmp_path / ".lens.partial").exists()


def test_config_records_provenance(tmp_path, tiny_pair_dirs):
    exp = tiny.load_experiment("logit_lens")
    base, inst = tiny_pair_dirs["llama"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("how do i make a cake ?\ntell me about the sun\nwhy is the sky blue ?\n")
    run = exp.main(["--base", str(base), "--instruct", str(inst), "--prompts", str(prompts), "--limit", "2",
                    "--targets", "sure", "--out", str(tmp_path / "r"), "--device", "cpu"])
    c = json.loads((run.dir / "config.json").read_text())
    assert c["pair"] is None and c["sources"] == {"base": str(base), "instruct": str(inst)}
    for which, folder in (("base", base), ("instruct", inst)):
        m = c["models"][which]
        assert m["kind"] == "folder" and m["folder"] == str(Path(folder).resolve())
        import hashlib

        assert m["sha256"]["weights"]["model.safetensors"] == hashlib.sha256(
            (Path(folder) / "model.safetensors").read_bytes()).hexdigest()
        assert "config.json" in m["sha256"]["config"]
    assert c["models"]["tokenizer"]["chat_template_sha256"]
    f = c["inputs"]["prompt_files"]["p"]
    assert f["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest() and f["n_used"] == 2
    assert c["seed"] == 0 and c["dtype"] == "float32" and c["device"] == "cpu"
    assert c["git"] is None or len(c["git"]["commit"]) == 40
    assert c["versions"]["transformers"] and c["argv"]


def test_run_all_gives_each_experiment_its_own_folder(tmp_path, monkeypatch):
    from probes import cli, experiments

    seen = []
    for name in experiments.EXPERIMENTS:
        module = experiments.load(name)
        monkeypatch.setattr(module, "run", lambda args, inputs, name=name: seen.append((name, args)) or None)
        monkeypatch.setattr(module, "report", lambda run: "")
    cli.main(["run", "all", "--out", str(tmp_path), "--seed", "1"])
    assert [n for n, _ in seen] == list(experiments.EXPERIMENTS)
    assert [a.out for _, a in seen] == [str(tmp_path / n) for n in experiments.EXPERIMENTS]
    assert all(a.seed == 1 for _, a in seen)


KILL_DRIVER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import tiny
from probes import checkpoints
puts = [0]
real_put = checkpoints.ChunkStore.put
def put(self, k, t):
    real_put(self, k, t)
    puts[0] += 1
    if puts[0] == {after}:
        os.kill(os.getpid(), signal.{sig})
checkpoints.ChunkStore.put = put
tiny.load_experiment("logit_lens").main({argv!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, sig):
    exp = tiny.load_experiment("logit_lens")
    common = ["--limit", "12", "--batch-size", "4", "--examples", "0", "--device", "cpu"]
    clean = exp.main([*common, "--out", str(tmp_path / "clean")])
    out = tmp_path / "killed"
    argv = [*common, "--out", str(out)]
    code = KILL_DRIVER.format(tests=str(Path(__file__).parent), after=3, sig=sig, argv=argv)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode != 0 and not out.exists()
    partial = tmp_path / ".killed.partial"
    assert len(list((partial / "chunks").glob("*.safetensors"))) == 3
    if sig == "SIGINT":
        assert json.loads((partial / "run.json").read_text())["status"] == "interrupted"
    from probes import checkpoints

    with pytest.raises(SystemExit, match="interrupted run"):
        exp.main(argv)
    stats = {}
    real = checkpoints.ChunkStore.compute

    def counting(self, k, fn):
        got = real(self, k, fn)
        stats["hits"], stats["misses"] = self.hits, self.misses
        return got

    checkpoints.ChunkStore.compute = counting
    try:
        resumed = exp.main([*argv, "--resume"])
    finally:
        checkpoints.ChunkStore.compute = real
    assert stats["hits"] == 3 and stats["misses"] > 0  # the finished chunks were reused, the rest computed
    assert json.loads((resumed.dir / "results.json").read_text()) == json.loads((clean.dir / "results.json").read_text())
    a, b = load_file(str(resumed.dir / "lens.safetensors")), load_file(str(clean.dir / "lens.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_resumes_from_stored_candidates(tmp_path):
    from probes import checkpoints, load_pair
    from probes import refusal as R

    pair = load_pair("toy", device="cpu")
    from probes.prompts import default_sets

    sets = {k: pair.encode(v[:8]) for k, v in default_sets(True, "train").items()}
    val = {k: pair.encode(v[:4]) for k, v in default_sets(True, "val").items()}
    tok = R.refusal_tokens(pair.tokenizer)
    cands = R.candidates(pair.instruct, sets["harmful"], sets["harmless"], progress=False)
    plain = R.sweep(pair.instruct, cands, val["harmful"], val["harmless"], tok, progress=False)
    store = checkpoints.ChunkStore(tmp_path / "chunks")
    with store.activate():
        first = R.sweep(pair.instruct, cands, val["harmful"], val["harmless"], tok, progress=False)
        n = store.misses
        again = R.sweep(pair.instruct, cands, val["harmful"], val["harmless"], tok, progress=False)
    assert n > 0 and store.hits == n  # every candidate scored once, then read back
    for name in ("bypass", "induce", "kl"):
        for s in (first, again):
            torch.testing.assert_close(getattr(s, name), getattr(plain, name), atol=0, rtol=0, equal_nan=True)


def test_per_token_kl_resumes_from_stored_chunks(tmp_path):
    from probes import checkpoints, load_pair
    from probes.compare import per_token_kl

    pair = load_pair("toy", device="cpu")
    batch = pair.encode(["how do i bake bread ?", "how do i build a bomb ?", "tell me about the moon"],
                        responses=["first , mix flour", "sorry , i cannot help", "the moon is"])
    plain = per_token_kl(pair, batch, batch_size=2, progress=False)
    store = checkpoints.ChunkStore(tmp_path / "chunks")
    with store.activate():
        first = per_token_kl(pair, batch, batch_size=2, progress=False)
        again = per_token_kl(pair, batch, batch_size=2, progress=False)
    assert store.misses == 2 and store.hits == 2
    for k, v in plain.tensors().items():
        assert torch.equal(first.tensors()[k], v) and torch.equal(again.tensors()[k], v)
