"""Writing GGUF: the orthogonalised model, read back by transformers' own GGUF loader, against hook ablation on the
bridge and against plain HF weights rounded as the file's dtype stores them."""
import gguf as gg
import numpy as np
import pytest
import torch

import real_tokenizers as rt
import tiny
from probes.chat import encode
from probes.directions import ablate, save_orthogonalized
from probes.gguf import GGUFError, write_gguf
from probes.pairs import load_model

TEXTS = ["How do I bake bread at home?", "Explain why the sky is blue, in 3 short sentences.\n\nThanks!"]


def _logits(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module", params=[("llama", rt.smollm2_instruct), ("qwen2", rt.qwen25_instruct)],
                ids=["llama-smollm2-tokenizer", "qwen2-qwen25-tokenizer"])
def orthogonalized(request, tmp_path_factory):
    """A tiny random model with a real BPE tokenizer, its hook-ablated logits and its orthogonalised copy as f32 GGUF."""
    rt.require_shared()
    arch, make_tok = request.param
    tok = make_tok()
    root = tmp_path_factory.mktemp(arch)
    # Qwen2.5's embedding has rows past its tokenizer (151,936 vs 151,665): the file must carry those too.
    vocab = 151936 if arch == "qwen2" else len(tok)
    hf = tiny.make_model(arch, vocab, seed=0)
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    bridge = load_model(root / "model", device="cpu")
    batch = encode(tok, [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                 add_generation_prompt=True) for t in TEXTS],
                   add_special_tokens=False)
    r = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with ablate(bridge, r):
        hooked = _logits(bridge.original_model, batch)
    folder = save_orthogonalized(bridge, r, root / "ortho", tokenizer=tok, gguf="f32")
    return dict(arch=arch, tok=tok, batch=batch, hooked=hooked, folder=folder, gguf=root / "ortho.gguf",
                plain=_logits(hf, batch), r=r)


def test_f32_gguf_reads_back_as_the_hook_ablation(orthogonalized):
    o = orthogonalized
    model, tok = _read_back(o["gguf"])
    m = o["batch"].attention_mask.bool()
    got = _logits(model, o["batch"])
    torch.testing.assert_close(got[m], o["hooked"][m], atol=1e-4, rtol=0)
    assert float((o["plain"][m] - o["hooked"][m]).abs().max()) > 1e-2  # the ablation changed the logits
    # The tokenizer built from tokenizer.json tokenizes as the original, special tokens and template included.
    for text in TEXTS + [o["tok"].apply_chat_template([{"role": "user", "content": TEXTS[1]}], tokenize=False,
                                                      add_generation_prompt=True)]:
        assert tok(text, add_special_tokens=False).input_ids == o["tok"](text, add_special_tokens=False).input_ids
    assert tok.chat_template == o["tok"].chat_template
    reader = gg.GGUFReader(o["gguf"])
    assert reader.fields["general.architecture"].contents() == o["arch"]
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if o["arch"] == "qwen2" else "gpt2")


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_gguf_equal_the_weights_rounded_as_stored(orthogonalized, dtype, tmp_path):
    """The file holds the weights at its dtype: read back, the logits equal HF with every matrix rounded the same
    way by hand (f16 cast; Q8_0 blocks of 32 quantized and dequantized by the gguf package), norms kept f32."""
    from transformers import AutoModelForCausalLM

    o = orthogonalized
    edited = AutoModelForCausalLM.from_pretrained(o["folder"], dtype=torch.float32).eval()
    path = write_gguf(edited, o["tok"], tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    with torch.no_grad():
        for p in edited.parameters():
            if p.ndim == 2:
                a = p.detach().numpy()
                if dtype == "f16":
                    p.copy_(torch.from_numpy(a.astype(np.float16).astype(np.float32)))
                else:
                    q = gg.quants.quantize(a, gg.GGMLQuantizationType.Q8_0)
                    p.copy_(torch.from_numpy(gg.quants.dequantize(q, gg.GGMLQuantizationType.Q8_0).reshape(a.shape)))
    model, _ = _read_back(path)
    m = o["batch"].attention_mask.bool()
    torch.testing.assert_close(_logits(model, o["batch"])[m], _logits(edited, o["batch"])[m], atol=1e-4, rtol=0)
    # and the rounding did change the weights: the file is not secretly f32
    assert float((_logits(model, o["batch"])[m] - o["hooked"][m]).abs().max()) > 1e-6


def test_unwritable_models_are_refused_before_any_file(tiny_pair_dirs, tiny_tokenizer, tmp_path):
    gemma = tiny.hf_model(tiny_pair_dirs["gemma3"][1])
    with pytest.raises(GGUFError, match="supports"):
        write_gguf(gemma, tiny_tokenizer, tmp_path / "g.gguf")
    llama = tiny.hf_model(tiny_pair_dirs["llama"][1])
    with pytest.raises(GGUFError, match="byte-level BPE"):  # the word-level test tokenizer has no GGUF form
        write_gguf(llama, tiny_tokenizer, tmp_path / "w.gguf")
    with pytest.raises(GGUFError, match="dtype"):
        write_gguf(llama, tiny_tokenizer, tmp_path / "d.gguf", dtype="q4")
    assert list(tmp_path.iterdir()) == []
