"""The refusal_geometry experiment: every part end to end on the toy pair with its numbers checked against the
modules' own results on the same prompts, and a resumed run that reuses finished parts (its bad input: test_cli)."""
from __future__ import annotations

import json

import pytest
import torch

import tiny
from probes import toy


def _toy_or_skip() -> None:
    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights absent (train with python -m probes.toy.train)")


SMALL = ["--pair", "toy", "--device", "cpu", "--n-train", "48", "--n-val", "16", "--n-test", "24",
         "--frontier-trials", "12", "--rdo-steps", "6", "--cone-steps", "3", "--cone-dims", "2", "--cone-samples", "3",
         "--target-tokens", "6", "--max-new-tokens", "8"]


@pytest.mark.slow
def test_every_part_on_toy_pair(tmp_path):
    _toy_or_skip()
    from probes import harmfulness as HF
    from probes import refusal
    from probes.directions import cosine
    from probes.pairs import load_pair

    main = tiny.load_experiment("refusal_geometry").main
    out = tmp_path / "toy"
    main([*SMALL, "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "ok" and r["parts"] == ["harmfulness", "cosmic", "steerability", "frontier", "cones"]
    layer = r["arditi"]["layer"]

    # Independent: the two directions' cosine at the chosen layer from the module on the same (filtered) train
    # prompts, and the refusal score of the un-intervened test prompts.
    pair = load_pair("toy", device="cpu")
    tok = refusal.refusal_tokens(pair.tokenizer)
    splits = {s: {k: toy.prompts(k, s)[:n] for k in ("harmful", "harmless")}
              for s, n in (("train", 48), ("test", 24))}
    tr = {k: pair.encode(v) for k, v in splits["train"].items()}
    te = {k: pair.encode(v) for k, v in splits["test"].items()}
    f_tr = r["filtered_train"]  # the toy's train prompts all pass the filter: the directions see these 48 + 48
    assert f_tr["harmful_kept"] == f_tr["harmless_kept"] == 48
    d = HF.directions(pair.instruct, tr["harmful"], tr["harmless"], progress=False)
    h = r["harmfulness"]
    assert h["directions"]["instruct"]["cosine"][layer] == pytest.approx(float(d.cosine()[layer]), abs=1e-9)
    assert r["harmfulness_headline"]["cosine"]["instruct"] == pytest.approx(float(d.cosine()[layer]), rel=1e-2)
    clean = refusal.score_prompts(pair.instruct, te["harmless"], tok).double()
    assert h["steering"]["instruct"]["baseline_mean"] == pytest.approx(float(clean.mean()), abs=1e-5)

    # COSMIC's choice against the reference's, both from the same candidates (on the full toy splits they are the
    # same candidate: test_cosmic); the cosine is that of the two candidates' difference-of-means vectors.
    c = r["cosmic"]
    pick = {"layer": c["selection"]["layer"], "position": c["selection"]["position"]}
    assert c["status"] == "ok" and c["comparison"]["arditi"] == {"layer": layer, "position": r["arditi"]["position"]}
    assert c["comparison"]["cosmic"] == pick and c["comparison"]["same"] == (pick == c["comparison"]["arditi"])
    cands = refusal.candidates(pair.instruct, tr["harmful"], tr["harmless"], progress=False)
    vec = {k: cands.direction(v["layer"], v["position"]).raw for k, v in c["comparison"].items()
           if k in ("cosmic", "arditi")}
    assert c["comparison"]["cosine"] == pytest.approx(float(cosine(vec["cosmic"], vec["arditi"])), abs=1e-9)

    # Steerability: per-prompt changes of every test prompt; their means are the reported means.
    s = r["steerability"]
    assert s["harmless"]["n"] == s["harmful"]["n"] == 24
    for kind in ("harmless", "harmful"):
        changes = torch.tensor(s[kind]["changes"], dtype=torch.float64)
        torch.testing.assert_close(changes.mean(-1), torch.tensor(s[kind]["mean_change"], dtype=torch.float64), atol=1e-9,
                                   rtol=0)
    assert s["harmful"]["ablation_mean"] < 0 < s["harmless"]["mean_change"][-1]  # ablation removes, addition adds

    # Frontier: both kinds searched with the asked trials; the Arditi point is a real measurement (every harmful
    # val prompt refused before, the val set's size) and its comparison is against those trials.
    f = r["frontier"]
    for label in ("plain", "norm-preserving"):
        assert len(f["search"][label]["trials"]) == 12
        assert f["search"][label]["baseline"]["refusals"] == f["arditi"][label]["n_harmful"] == 16
        pts = [(t["refusals"], t["kl"]) for t in f["search"][label]["trials"]]
        a = f["arditi"][label]
        dominating = [t["number"] for t in f["search"][label]["trials"]
                      if t["refusals"] <= a["refusals"] and t["kl"] <= a["kl"]
                      and (t["refusals"], t["kl"]) != (a["refusals"], a["kl"])]
        assert f["comparison"][label]["dominating"] == dominating and len(pts) == 12

    # Cones: the random control leaves refusal where it was; the difference of means removes and induces it.
    k = r["cones"]
    assert k["effects"]["dim"]["ablated_rate"] <= 0.1 and k["effects"]["dim"]["added_rate"] >= 0.9
    rand = k["cones"]["2"]["evaluation"]["random"]
    assert rand["ablated_rate"]["min"] >= 0.9 and rand["added_rate"]["max"] <= 0.1
    assert -1 <= k["cosine_rdo_dim"] <= 1 and k["repind"]["repind_loss"] >= 0

    for name in ("harmfulness_vs_refusal", "harmfulness_steering", "cosmic_scores", "steerability",
                 "steerability_slopes", "frontier", "cone_effects", "repind", "cone_training"):
        assert (out / f"{name}.html").exists(), name
    page = (out / "index.html").read_text()
    for part in ("harmfulness", "cosmic", "steerability", "frontier", "cones"):
        assert f"{part}_headline" in page  # every part's headline numbers on the run page


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_parts(tmp_path, monkeypatch):
    _toy_or_skip()
    from probes import harmfulness as HF
    from probes import steerability as ST

    exp = tiny.load_experiment("refusal_geometry")
    small = [*SMALL, "--parts", "harmfulness,steerability"]
    clean = json.loads((exp.main([*small, "--out", str(tmp_path / "clean")]).dir / "results.json").read_text())
    argv = [*small, "--out", str(tmp_path / "run")]
    real = ST.refusal_steerability

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ST, "refusal_steerability", stop)  # interrupted after the harmfulness part
    with pytest.raises(KeyboardInterrupt):
        exp.main(argv)
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.partial").exists()
    monkeypatch.setattr(ST, "refusal_steerability", real)

    def again(*a, **kw):
        raise AssertionError("a finished part was computed again")

    monkeypatch.setattr(HF, "directions", again)  # the harmfulness part must come back from the run's store
    res = json.loads((exp.main([*argv, "--resume"]).dir / "results.json").read_text())
    for key in ("harmfulness", "harmfulness_headline", "steerability", "steerability_headline", "arditi"):
        assert res[key] == clean[key], key
