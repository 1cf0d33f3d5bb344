"""The model_diff experiment on the toy pair: its saved dictionaries, numbers and stores agree with independent
recomputations (FVU and Latent Scaling from the saved weights on the saved store, the refusal direction's cosine
from `refusal.candidates`, steering from the plain addition hooks), and bad input fails before any model loads."""
import json

import pytest
import torch
from safetensors.torch import load_file

from probes import dictionaries as D
from probes import refusal
from probes.store import Store

FLAGS = ["--steps", "300", "--n-train", "32", "--n-val", "8", "--max-new-tokens", "6", "--control-draws", "3"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from probes import cli

    out = tmp_path_factory.mktemp("model_diff") / "run"
    assert cli.main(["run", "model_diff", "--out", str(out), *FLAGS]) == 0
    return out, json.loads((out / "results.json").read_text())


def _load(out, name, cls, *args, **kwargs):
    dc = cls(*args, **kwargs)
    dc.load_state_dict(load_file(str(out / f"dictionary_{name}.safetensors")))
    return dc.eval()


@pytest.mark.slow
def test_saved_dictionaries_reproduce_the_reported_numbers(toy_run):
    out, res = toy_run
    d, n, k, layer = 64, res["n_latents"], res["k"], res["layer"]
    assert (n, layer) == (256, 2) and sum(res["classes"].values()) == n
    val = Store(out / "store" / "val")
    assert val.sets == ["harmful", "harmless", "harmless_raw"] and val.rows == res["store"]["val"]["rows"]

    def batches():
        return val.iter_batches(4096, layers=layer)
    cc = _load(out, "batchtopk", D.BatchTopKCrosscoder, d, n, k)
    assert D.fvu(cc, batches()) == pytest.approx(res["quality"]["batchtopk"]["fvu"], rel=1e-6)
    assert int(D.dead_latents(cc, batches()).sum()) == res["quality"]["batchtopk"]["dead"]
    sae = _load(out, "diff_sae", D.DiffSAE, d, n, k)
    assert D.fvu(sae, batches()) == pytest.approx(res["quality"]["diff_sae"]["fvu"], rel=1e-6)
    assert all(0 < v < 0.5 for v in res["quality"]["batchtopk"]["fvu"].values())
    ls = D.latent_scaling(cc, batches())
    saved = load_file(str(out / "latent_scaling.safetensors"))
    torch.testing.assert_close(saved["nu_error"], ls.nu_error, equal_nan=True)
    assert [D.classify(ls.delta_norm).count(c) for c in D.KINDS] == [res["classes"][c] for c in D.KINDS]
    # Role mass: every stored token's role counted once, the by-role mass summing to the latents' total mass.
    mass = load_file(str(out / "role_mass.safetensors"))
    codes = torch.cat([cc.encode(cc.prepare(b)) for b in batches()])
    torch.testing.assert_close(mass["by_role"].sum(1), codes.double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_refusal_alignment_and_steering_against_direct_computations(toy_run):
    from probes.activations import last_logits
    from probes.directions import addition_hooks
    from probes.pairs import load_pair
    from probes.toy import prompts

    out, res = toy_run
    pair = load_pair("toy")
    cc = _load(out, "batchtopk", D.BatchTopKCrosscoder, 64, res["n_latents"], res["k"])
    cands = refusal.candidates(pair.instruct, pair.encode(prompts("harmful", "train")[:32]),
                               pair.encode(prompts("harmless", "train")[:32]), layers=[2], progress=False)
    raw = cands.direction(2, -1).raw
    best = res["refusal_aligned_latent"]
    dec = cc.W_dec.detach()[best["latent"], 1].double()
    assert float(torch.nn.functional.cosine_similarity(dec, raw.double(), dim=0)) == pytest.approx(best["cosine"],
                                                                                                      abs=1e-6)
    assert abs(best["cosine"]) > 0.5  # the toy's refusal direction is carried by one latent
    steer = res["steering"]
    harmless = pair.encode(prompts("harmless", "val")[:8])
    ids = refusal.refusal_tokens(pair.tokenizer)
    unit = dec.float() / dec.norm().float() * (1 if best["cosine"] >= 0 else -1)
    for c, got in zip(steer["coeffs"], steer["latent"]):
        hooks = addition_hooks(pair.instruct, unit * raw.norm().float(), 2, c) if c else ()
        want = refusal.refusal_score(last_logits(pair.instruct, harmless, hooks), ids).mean()
        assert got == pytest.approx(float(want), abs=1e-4)
    assert steer["latent"][steer["coeffs"].index(1.0)] > steer["latent"][0] + 5  # steering along it induces refusal


@pytest.mark.slow
def test_kl_gap_and_role_numbers_are_consistent(toy_run):
    out, res = toy_run
    kl = res["kl_gap"]
    tested = kl["tested"]
    assert tested in kl["recovery"] and kl["gap"] > 0 and len(kl["control"]) == 3
    assert kl["sizes"][tested] == len(res["chat_only"] or kl["top_delta_norm"])
    assert kl["recovery"]["reconstruction"] > 0.9  # the crosscoder's reconstruction closes the gap almost whole
    assert res["chat_only_on_template_share"] is None or 0 <= res["chat_only_on_template_share"] <= 1
    pages = {p.name for p in out.glob("*.html")}
    assert {"nu_scatter.html", "role_mass.html", "top_tokens.html", "kl_recovery.html", "index.html"} <= pages


def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from probes import cli, pairs

    monkeypatch.setattr(pairs, "load_pair", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, msg in ((["--k", "9", "--latents", "8"], "exceeds"), (["--l1", "0"], "--l1"),
                      (["--steer-coeffs", "1", "2"], "include 0"), (["--positions", "user"], "positions")):
        assert cli.main(["run", "model_diff", "--out", str(tmp_path / "x"), *argv]) != 0
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
