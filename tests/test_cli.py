"""The command line: help per experiment, the same flags everywhere, one-line errors before any model loads."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from probes import cli, experiments
from probes.args import group_names, layer_spec, warn_unknown

TOY_WORDS = "how do i make a cake ?"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any experiment gets as far as loading weights."""
    import probes.args

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    # Import every experiment first: one imported while probes.args is patched would keep `refuse` for good.
    modules = [experiments.load(name) for name in experiments.EXPERIMENTS]
    monkeypatch.setattr(probes.args, "load_pair_for", refuse)
    for module in modules:
        monkeypatch.setattr(module, "load_pair_for", refuse)


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_experiments_one_line_each(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, summary in experiments.EXPERIMENTS.items():
        assert f"  {name}" in out and summary in out
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in experiments.EXPERIMENTS)


@pytest.mark.parametrize("name,own", [("refusal_direction", "--n-train"), ("logit_lens", "--targets"),
                                      ("activation_diff", "--response"), ("template_attention", "--top-k"),
                                      ("refusal_geometry", "--parts")])
def test_each_experiment_has_its_own_help_and_the_shared_flags(name, own, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: probes run {name}" in out and own in out
    for flag in ("--harmful", "--harmless", "--prompts", "--column", "--key", "--limit", "--layers", "--positions",
                 "--system", "--raw", "--dtype", "--device", "--batch-size", "--seed", "--debug"):
        assert flag in out, (name, flag)


def test_pairs_shows_the_notes_column(capsys):
    code, out, _ = run_cli(["pairs"], capsys)
    header = out.splitlines()[0].split()
    assert code == 0 and header[-1] == "notes"
    assert "gated" in out and "thinks by default" in out


def test_layer_and_limit_flags_are_validated():
    assert layer_spec("0,4,8") == [0, 4, 8] and layer_spec("-1") == [-1]
    assert layer_spec("0:12") == slice(0, 12) and layer_spec("2:") == slice(2, None)
    for bad in ("a", "1:2:3:4", "0,,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            layer_spec(bad)
    p = experiments.load("logit_lens").parser()
    args = p.parse_args(["--model", "some/model"])  # one model in both roles
    assert args.base == args.instruct == args.model == "some/model"
    with pytest.raises(SystemExit):
        p.parse_args(["--limit", "-1"])
    with pytest.raises(SystemExit):
        p.parse_args(["--limit", "0"])


@pytest.mark.parametrize("argv,message", [
    (["run", "logit_lens", "--prompts", "nowhere.csv"], "nowhere.csv: no such prompt file"),
    (["run", "logit_lens", "--layers", "9"], "--layers: layers [9] out of range for a 4-layer model"),
    (["run", "logit_lens", "--positions", "user[0"], "--positions: cannot read position spec"),
    (["run", "logit_lens", "--positions", "assistant[0]"], "unknown role 'assistant'"),
    (["run", "refusal_direction", "--raw"], "--raw does not apply"),
    (["run", "template_attention", "--raw"], "--raw does not apply"),
    (["run", "refusal_geometry", "--raw"], "--raw does not apply"),
    (["run", "refusal_geometry", "--positions", "user[-1]"], "--positions does not apply"),
    (["run", "activation_diff", "--positions", "last"], "--positions does not apply"),
    (["run", "refusal_direction", "--prompts", "a.csv"], "give --harmful and --harmless"),
    (["run", "logit_lens", "--harmful", "a.csv"], "--harmful and --harmless go together"),
    (["run", "logit_lens", "--raw", "--system", "be brief"], "--system needs the chat template"),
    (["run", "logit_lens", "--pair", "nope"], "nope"),
    (["run", "logit_lens", "--model", "toy:instruct", "--base", "toy:base"], "--model names one model"),
    # `all` checks every experiment's inputs before the first one runs.
    (["run", "all", "--raw"], "refusal_direction: --raw does not apply"),
    (["run", "all", "--positions", "last"], "refusal_direction: --positions does not apply"),
    (["run", "all", "--layers", "7"], "--layers: layers [7] out of range"),
])
def test_input_errors_are_one_line_before_any_model_loads(argv, message, capsys, tmp_path, no_model_loads):
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_run_all_gives_each_experiment_its_own_flags(capsys):
    parsed = cli._parse_all(["--pair", "toy", "--n-val", "8", "--ablation", "affine", "--limit", "5"])
    assert parsed["refusal_direction"].n_val == 8 and parsed["refusal_direction"].ablation == "affine"
    assert all(a.limit == 5 and a.pair == "toy" for a in parsed.values())
    assert not hasattr(parsed["logit_lens"], "n_val")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "all", "--n-vall", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "probes run all: error: no experiment takes --n-vall 8" in err
    assert len(err.strip().splitlines()) == 1


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "logit_lens", "--limit", "-3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "probes run logit_lens: error: argument --limit: must be >= 1, got -3" in err


@pytest.mark.parametrize("argv,message", [
    (["--parts", "harmfulness,nope"], "comma-separated parts from harmfulness"),
    (["--cone-dims", "1"], "cone dimensions from 2 to 8"),
    (["--steer-coeffs", "1,-2"], "positive coefficients"),
])
def test_refusal_geometry_flags_are_checked_when_parsed(argv, message, capsys, no_model_loads):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "refusal_geometry", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(capsys, tmp_path, no_model_loads):
    code, _, err = run_cli(["run", "logit_lens", "--prompts", "nowhere.csv", "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "no such prompt file" in err


def test_same_stem_in_two_folders_is_two_groups(tmp_path):
    for folder, words in (("a", "how do i make a cake ?"), ("b", "tell me about the sun")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "harmful.txt").write_text(words + "\n")
    paths = [str(tmp_path / "a" / "harmful.txt"), str(tmp_path / "b" / "harmful.txt")]
    assert group_names(paths) == ["a/harmful", "b/harmful"]
    assert group_names([str(tmp_path / "a" / "harmful.txt"), str(tmp_path / "b" / "other.txt")]) == ["harmful",
                                                                                                      "other"]
    args = experiments.load("logit_lens").parser().parse_args(["--prompts", *paths])
    groups, files = experiments.load("logit_lens").prepare(args)
    assert groups == {"a/harmful": ["how do i make a cake ?"], "b/harmful": ["tell me about the sun"]}
    assert files["a/harmful"] == (paths[0], 1) and files["b/harmful"] == (paths[1], 1)
    with pytest.raises(SystemExit, match="same prompt file"):
        group_names([paths[0], paths[0]])


def test_column_and_key_pick_fields(tmp_path):
    (tmp_path / "p.csv").write_text("id,text\n1,how do i make a cake ?\n2,tell me about the sun\n")
    (tmp_path / "q.jsonl").write_text('{"q": "hello world"}\n{"q": "why is the sky"}\n')
    lens = experiments.load("logit_lens")
    args = lens.parser().parse_args(["--prompts", str(tmp_path / "p.csv"), str(tmp_path / "q.jsonl"),
                                     "--column", "text", "--key", "q", "--limit", "1"])
    groups, _ = lens.prepare(args)
    assert groups == {"p": ["how do i make a cake ?"], "q": ["hello world"]}
    with pytest.raises(SystemExit, match="no prompt file is a CSV"):
        lens.prepare(lens.parser().parse_args(["--prompts", str(tmp_path / "q.jsonl"), "--column", "text"]))


def test_unknown_token_fraction_warns(tiny_tokenizer):
    with pytest.warns(UserWarning, match=r"'odd': 67% of its tokens are the unknown token"):
        out = warn_unknown(tiny_tokenizer, {"odd": ["zebra quokka cake"], "fine": [TOY_WORDS]})
    assert out == {"odd": pytest.approx(2 / 3), "fine": 0.0}


def test_shared_flags_reach_the_analysis(tmp_path, tiny_pair_dirs, capsys):
    """--layers, --positions, --system and --raw change what is computed (checked on the results), and the
    unknown-token fraction is recorded."""
    base, inst = tiny_pair_dirs["llama"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("how do i make a cake ?\ntell me about the sun\n")
    common = ["--base", str(base), "--instruct", str(inst), "--prompts", str(prompts), "--device", "cpu",
              "--examples", "0", "--targets", "sorry"]
    code, out, err = run_cli(["run", "logit_lens", *common, "--out", str(tmp_path / "a"), "--layers", "-1",
                              "--positions", "last,user[0]", "--system", "hello world"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["layers"] == [2] and res["positions"] == ["last", "user[0]"] and res["summary_position"] == "user[0]"
    assert res["unknown_token_fraction"] == {"p": 0.0}
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["system"] == "hello world" and config["layers"] == [-1]
    code, out, err = run_cli(["run", "logit_lens", *common, "--out", str(tmp_path / "b"), "--raw"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["positions"] == ["last"] and res["layers"] == [0, 1, 2]
    code, out, err = run_cli(["run", "logit_lens", *common, "--out", str(tmp_path / "c"), "--layers", "1:"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "results.json").read_text())["layers"] == [1, 2]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["layers"] == "1:"


def test_thin_script_is_the_cli():
    """experiments/*.py are thin scripts: the same parser and errors as `probes run NAME`."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "logit_lens.py"
    res = subprocess.run([sys.executable, str(script), "--prompts", "nowhere.csv"], capture_output=True, text=True)
    assert res.returncode == 1 and "nowhere.csv: no such prompt file" in res.stderr
    assert "Traceback" not in res.stderr


def test_toy_vocabulary_on_advbench_warns_with_the_fraction():
    """The toy pair's word-level vocabulary covers its own corpus, not AdvBench: most tokens are <unk>."""
    import real_tokenizers as rt

    from probes.pairs import load_tokenizer, resolve_source
    from probes.prompts import load_prompts

    shared = rt.require_shared()
    advbench = load_prompts(shared / "prompts" / "advbench" / "harmful_behaviors.csv")
    tok = load_tokenizer(resolve_source("toy:instruct"))
    ids = tok(advbench.instructions, add_special_tokens=False)["input_ids"]
    expected = sum(t == tok.unk_token_id for x in ids for t in x) / sum(len(x) for x in ids)
    with pytest.warns(UserWarning, match=rf"'advbench': {expected:.0%} of its tokens are the unknown token"):
        out = warn_unknown(tok, {"advbench": advbench.instructions})
    assert out["advbench"] == pytest.approx(expected) and 0.5 < expected < 0.7
