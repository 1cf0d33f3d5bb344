"""Pair loading: pairing checks, offline errors, and the TransformerBridge traps we guard against."""
import json
import shutil
import warnings

import pytest
import torch

import tiny
from probes import registry
from probes.pairs import ModelNotAvailableError, PairingError, load_model, load_pair


def test_load_pair_from_local_folders(tiny_pair_dirs):
    base, instruct = tiny_pair_dirs["qwen2"]
    pair = load_pair(base, instruct, device="cpu")
    assert (pair.n_layers, pair.d_model, pair.n_heads) == (3, 64, 4)
    assert pair.d_vocab == len(pair.tokenizer)
    # Two distinct models (different seeds), both frozen and in eval mode.
    assert not torch.equal(pair.base.original_model.lm_head.weight, pair.instruct.original_model.lm_head.weight)
    for model in pair.models.values():
        assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("change", "field"), [
    ({"num_hidden_layers": 2}, "n_layers"),
    ({"hidden_size": 32, "intermediate_size": 64}, "d_model"),
    ({"num_attention_heads": 2, "num_key_value_heads": 2}, "n_heads"),
])
def test_pairing_errors_name_the_field(tmp_path, tiny_pair_dirs, change, field):
    base, _ = tiny_pair_dirs["llama"]
    other = shutil.copytree(base, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(change)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairingError, match=field) as err:
        load_pair(base, other, device="cpu")
    assert err.value.field == field


def test_pairing_error_on_architecture_and_vocabulary(tiny_pair_dirs, tmp_path):
    with pytest.raises(PairingError, match="architecture"):
        load_pair(tiny_pair_dirs["llama"][0], tiny_pair_dirs["qwen2"][1], device="cpu")
    other = shutil.copytree(tiny_pair_dirs["llama"][0], tmp_path / "vocab")
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PairingError, match="d_vocab"):
        load_pair(tiny_pair_dirs["llama"][0], other, device="cpu")


def test_differing_tokenizer_warns(tiny_pair_dirs, tmp_path):
    base = shutil.copytree(tiny_pair_dirs["llama"][0], tmp_path / "base")
    tok_file = base / "tokenizer.json"
    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    vocab["cake"], vocab["bread"] = vocab["bread"], vocab["cake"]  # same size, two ids swapped
    tok_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="differ in 2 ordinary tokens"):
        load_pair(base, tiny_pair_dirs["llama"][1], device="cpu")


def test_identical_tokenizers_do_not_warn(tiny_pair_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_pair(*tiny_pair_dirs["gpt2"], device="cpu")


def test_offline_hub_id_not_cached_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not in the local hub cache"):
        load_pair("probes-test/does-not-exist-base", "probes-test/does-not-exist-instruct")
    with pytest.raises(FileNotFoundError):
        load_model("./no/such/folder")


def test_registry_has_the_required_pairs():
    keys = set(registry.REGISTRY)
    for key in ["toy", "smollm2-135m", "smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b",
                "qwen3-0.6b", "qwen3-1.7b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "gemma-2-2b",
                "gemma-2-9b", "gemma-3-1b", "olmo-2-1b", "mistral-7b"]:
        assert key in keys
    assert registry.get("Qwen2.5-0.5B").instruct == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(KeyError, match="registered pairs"):
        registry.get("nope")


def test_bridge_traps_are_guarded(tiny_pair_dirs):
    base, _ = tiny_pair_dirs["llama"]
    # An in-memory tokenizer without add_bos_token (the bridge would try to reload it by name and crash).
    tok = tiny.make_tokenizer()
    assert not tok.init_kwargs.get("add_bos_token")
    # A tokenizer without BOS (Qwen-style): the bridge would set bos_token to eos on the object it is given.
    tok.bos_token = None
    model = load_model(base, tokenizer=tok, device="cpu")
    assert tok.bos_token is None and not tok.init_kwargs.get("add_bos_token")
    # Forward passes build no autograd graph.
    logits = model(torch.tensor([[1, 7, 8]]))
    assert not logits.requires_grad


def test_offload_keeps_models_on_cpu_until_used(tiny_pair_dirs):
    pair = load_pair(*tiny_pair_dirs["llama"], device="cpu", offload=True)
    with pair.on_device("instruct") as model:
        assert model is pair.instruct
    with pytest.raises(KeyError):
        pair["chat"]


def test_bfloat16_pair_records_close_to_float32(tiny_pair_dirs):
    from probes.activations import record

    fp32 = load_pair(*tiny_pair_dirs["llama"], device="cpu")
    bf16 = load_pair(*tiny_pair_dirs["llama"], device="cpu", dtype=torch.bfloat16)
    assert next(bf16.instruct.parameters()).dtype == torch.bfloat16
    batch = fp32.encode(["how do i make a cake ?", "hello"])
    a = record(fp32.instruct, batch, positions="post_instruction", progress=False).tensor
    b = record(bf16.instruct, batch, positions="post_instruction", progress=False).tensor
    assert b.dtype == torch.float32  # recorded activations leave the model as float32
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-2 over 3 layers is its precision, not a bug.
    assert float((a - b).norm() / a.norm()) < 0.05


def test_cli_lists_pairs(capsys):
    from probes.cli import main

    assert main(["pairs"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-0.5b" in out and "Qwen/Qwen2.5-0.5B-Instruct" in out and "toy" in out


def test_passed_hf_model_is_not_mutated(tiny_pair_dirs):
    from transformers import AutoModelForCausalLM

    folder = tiny_pair_dirs["llama"][1]
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    modules_before = [type(m).__name__ for m in hf.modules()]
    model = load_model(folder, hf_model=hf, device="cpu")
    assert hf.config._attn_implementation == "sdpa"
    assert [type(m).__name__ for m in hf.modules()] == modules_before
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    # Without the copy the bridge rewires the caller's model: the trap the copy guards against.
    load_model(folder, hf_model=hf, device="cpu", copy_hf_model=False)
    assert hf.config._attn_implementation == "eager"


def test_hub_id_from_the_cache_loads_like_the_local_folder(tiny_pair_dirs, tmp_path):
    """Lay the tiny pair out as a hub cache and load it by hub id, offline, in a fresh process."""
    import subprocess
    import sys

    cache = tmp_path / "hub"
    for which, folder in zip(("base", "instruct"), tiny_pair_dirs["llama"]):
        repo = cache / f"models--probes-test--tiny-{which}"
        shutil.copytree(folder, repo / "snapshots" / "0123abc")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
    code = (
        "import torch, probes\n"
        "pair = probes.load_pair('probes-test/tiny-base', 'probes-test/tiny-instruct', device='cpu')\n"
        "local = probes.load_pair(*map(str, __import__('sys').argv[1:3]), device='cpu')\n"
        "batch = pair.encode(['how do i make a cake ?'])\n"
        "for which in ('base', 'instruct'):\n"
        "    a = probes.record(pair[which], batch, positions='post_instruction', progress=False).tensor\n"
        "    b = probes.record(local[which], batch, positions='post_instruction', progress=False).tensor\n"
        "    assert torch.equal(a, b), which\n"
        "print('same', pair.name)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *map(str, tiny_pair_dirs["llama"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "same tiny-base__tiny-instruct" in out.stdout
