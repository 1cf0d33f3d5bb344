"""The activation store holds what `record` (and so HF's hidden_states) gives, resumes a killed write to the same
bytes, refuses other inputs, detects damage and keeps its statistics and memory true."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from probes import store as S
from probes import toy
from probes.activations import record
from probes.chat import ROLE_ID, encode
from probes.pairs import load_pair
from probes.store import Store, StoreError, combine, moments, write_store

PROMPTS = ["how do i make a cake ?", "tell me about the sun please , why is the sky", "hello",
           "write a poem about the moon", "can you help with this ?"]


@pytest.fixture(scope="module")
def llama_pair(tiny_pair_dirs):
    return load_pair(*tiny_pair_dirs["llama"], device="cpu")


@pytest.fixture(scope="module")
def toy_pair():
    return load_pair("toy", device="cpu")


def rows_of(st, layers=None, hook=None, batch_rows=10_000):
    """Every row of a store, in order, as one dict."""
    parts = list(st.iter_batches(batch_rows, layers=layers, hook=hook))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_all_tokens_equal_record_and_hf_hidden_states(tmp_path, llama_pair, tiny_pair_dirs):
    batch = encode(llama_pair.tokenizer, PROMPTS)  # left-padded: "all" must skip the padding
    st = write_store(llama_pair, {"chat": batch}, tmp_path / "s", hooks=["resid_pre", "resid_post"],
                     shard_tokens=17, batch_size=2, progress=False)
    lengths = batch.attention_mask.sum(-1)
    assert st.rows == int(lengths.sum()) and len(st) == -(-st.rows // 17)
    for hook in ("resid_pre", "resid_post"):
        got = rows_of(st, hook=hook)  # base/instruct: [rows, layer, d]
        for which in ("base", "instruct"):
            for i in range(len(batch)):
                ref = record(llama_pair[which], batch[i : i + 1], hooks=hook, positions="all", progress=False).tensor
                sel = got["prompt_id"] == i
                torch.testing.assert_close(got[which][sel], ref[0].transpose(0, 1), atol=1e-5, rtol=0)
    # Independently of record: HF's hidden_states at the real tokens (resid_pre of layer l = hidden_states[l]).
    got = rows_of(st, hook="resid_pre")
    real = batch.attention_mask.bool()
    for which, folder in zip(("base", "instruct"), tiny_pair_dirs["llama"]):
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            hidden = tiny.hf_model(folder)(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                                           output_hidden_states=True).hidden_states
        for layer in range(llama_pair.n_layers):
            torch.testing.assert_close(got[which][:, layer], hidden[layer][real], atol=1e-5, rtol=0)
    # Labels: prompt, position among the real tokens, role, set, in prompt-major order.
    assert torch.equal(got["prompt_id"], torch.arange(len(batch)).repeat_interleave(lengths))
    assert torch.equal(got["position"], torch.cat([torch.arange(int(n)) for n in lengths]))
    assert torch.equal(got["role"], batch.roles[real])
    assert bool((got["set"] == 0).all()) and st.sets == ["chat"]
    assert torch.equal(got["base"][:, 0], rows_of(st, layers=0, hook="resid_pre")["base"])  # an int layer: [rows, d]


def test_position_specs_and_sets_on_the_toy_pair(tmp_path, toy_pair):
    sets = {"harmful": toy.prompts("harmful", "train")[:6], "harmless": toy.prompts("harmless", "train")[:5]}
    positions = ["post_instruction", "mean(user)"]
    for dtype in (torch.float32, torch.bfloat16):
        st = write_store(toy_pair, sets, tmp_path / str(dtype), layers=[1, 3], positions=positions,
                         shard_tokens=8, dtype=dtype, batch_size=4, progress=False)
        got = rows_of(st)
        offset = 0
        for si, (name, prompts) in enumerate(sets.items()):
            batch = toy_pair.encode(prompts)
            k = 4  # three post-instruction tokens and the user mean
            n = len(batch) * k
            sl = slice(offset, offset + n)
            for which in ("base", "instruct"):
                ref = record(toy_pair[which], batch, layers=[1, 3], positions=positions, batch_size=4,
                             progress=False).tensor  # [prompt, layer, k, d]
                # Same batches, same gathers: the same floats, cast the same way.
                assert torch.equal(got[which][sl], ref.transpose(1, 2).flatten(0, 1).to(dtype))
            lengths = batch.attention_mask.sum(-1)
            assert torch.equal(got["prompt_id"][sl], torch.arange(len(batch)).repeat_interleave(k))
            expected_pos = torch.stack([lengths - 3, lengths - 2, lengths - 1, torch.full_like(lengths, -1)], 1)
            assert torch.equal(got["position"][sl], expected_pos.flatten())
            expected_role = torch.tensor([ROLE_ID["post_instruction"]] * 3 + [ROLE_ID["user"]]).repeat(len(batch))
            assert torch.equal(got["role"][sl], expected_role)
            assert bool((got["set"][sl] == si).all())
            offset += n
        assert st.rows == offset and st.sets == list(sets)
        assert st.manifest["spec"]["position_labels"] == ["post_instruction[-3]", "post_instruction[-2]",
                                                          "post_instruction[-1]", "mean(user)"]


def test_one_model_of_a_mapping(tmp_path, llama_pair):
    batch = encode(llama_pair.tokenizer, PROMPTS[:2])
    st = write_store({"chat": llama_pair.instruct}, batch, tmp_path / "s", models=("chat",), layers=-1,
                     positions="user[-1]", progress=False)
    ref = record(llama_pair.instruct, batch, layers=-1, positions="user[-1]", progress=False).tensor
    got = rows_of(st)
    assert list(got) == ["prompt_id", "position", "role", "set", "chat"]
    torch.testing.assert_close(got["chat"][:, 0], ref[:, 0, 0], atol=0, rtol=0)


def test_welford_statistics_equal_torch_on_the_concatenation(tmp_path, toy_pair):
    prompts = {"a": toy.prompts("harmful", "train")[:7], "b": toy.prompts("harmless", "train")[:4]}
    for dtype in ("float32", "bfloat16"):
        st = write_store(toy_pair, prompts, tmp_path / dtype, hooks=["resid_pre", "resid_mid"], layers=[0, 2],
                         shard_tokens=23, dtype=dtype, batch_size=3, progress=False)
        assert len({s["rows"] for s in st.manifest["shards"]}) == 2  # full shards and a shorter last one
        for hook in ("resid_pre", "resid_mid"):
            got = rows_of(st, hook=hook)
            for which in ("base", "instruct"):
                for li, layer in enumerate((0, 2)):
                    x = got[which][:, li].double()
                    assert st.count(which, hook, layer) == x.shape[0] == st.rows
                    torch.testing.assert_close(st.mean(which, hook, layer), x.mean(0), atol=1e-12, rtol=1e-12)
                    torch.testing.assert_close(st.var(which, hook, layer), x.var(0), atol=1e-12, rtol=1e-10)
                    torch.testing.assert_close(st.var(which, hook, layer, correction=0), x.var(0, correction=0),
                                               atol=1e-12, rtol=1e-10)
        # A partial reader combines the shards' own statistics: the same numbers as the complete store's file.
        partial = Store(st.path, allow_partial=True)
        partial.manifest["complete"] = False
        torch.testing.assert_close(partial.var("base", "resid_pre", 2), st.var("base", "resid_pre", 2), atol=1e-12,
                                   rtol=1e-12)


def test_parallel_welford_is_stable_on_a_planted_offset():
    torch.manual_seed(0)
    x = 1e6 + torch.randn(1000, 5, dtype=torch.float64)  # a large mean: the naive sum-of-squares would cancel
    acc = (0, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    for part in torch.split(x, [1, 10, 300, 7, 682]):
        acc = combine(acc, moments(part))
    assert acc[0] == 1000
    torch.testing.assert_close(acc[1], x.mean(0), atol=1e-9, rtol=0)
    torch.testing.assert_close(acc[2] / 999, x.var(0), atol=0, rtol=1e-9)


def test_batches_span_shards_and_shuffle_keeps_rows_aligned(tmp_path, toy_pair):
    st = write_store(toy_pair, {"h": toy.prompts("harmless", "val")[:5]}, tmp_path / "s", layers=[2],
                     shard_tokens=13, batch_size=2, progress=False)
    plain = rows_of(st)
    sizes = [len(b["prompt_id"]) for b in st.iter_batches(10)]
    assert sizes == [10] * (st.rows // 10) + ([st.rows % 10] if st.rows % 10 else [])
    assert all(len(b["role"]) == 10 for b in st.iter_batches(10, drop_last=True))
    whole = {k: torch.cat([st.shard(i)[k] for i in range(len(st))]) for k in ("prompt_id", "base/resid_post/2")}
    assert torch.equal(plain["base"][:, 0], whole["base/resid_post/2"])
    shuffled = [b for b in st.iter_batches(6, shuffle=True, seed=3)]
    again = [b for b in st.iter_batches(6, shuffle=True, seed=3)]
    other = [b for b in st.iter_batches(6, shuffle=True, seed=4)]
    cat = {k: torch.cat([b[k] for b in shuffled]) for k in shuffled[0]}
    assert all(torch.equal(a[k], b[k]) for a, b in zip(shuffled, again) for k in a)
    assert not torch.equal(cat["prompt_id"], torch.cat([b["prompt_id"] for b in other]))
    assert not torch.equal(cat["position"], plain["position"])
    # Every row moves with its labels and its partner model's row: look each up by (prompt, position).
    where = {(int(p), int(q)): i for i, (p, q) in enumerate(zip(plain["prompt_id"], plain["position"]))}
    idx = torch.tensor([where[int(p), int(q)] for p, q in zip(cat["prompt_id"], cat["position"])])
    assert sorted(idx.tolist()) == list(range(st.rows))
    for k in ("base", "instruct", "role", "set"):
        assert torch.equal(cat[k], plain[k][idx])


KILL_DRIVER = """
import os, signal, sys, torch
torch.set_num_threads(1)
from probes import store
from probes.chat import encode
from probes.pairs import load_pair
saves = [0]
real_save = store._save
def save(tensors, meta, path):
    sha = real_save(tensors, meta, path)
    saves[0] += 1
    if saves[0] == {after}:  # this shard is on disk, the manifest does not list it yet
        os.kill(os.getpid(), signal.SIGKILL)
    return sha
store._save = save
pair = load_pair({base!r}, {instruct!r}, device="cpu")
store.write_store(pair, {{"chat": encode(pair.tokenizer, {prompts!r})}}, {out!r}, hooks=["resid_pre", "resid_post"],
                  layers=[0, 2], shard_tokens=11, batch_size=1, progress=False)
"""


def test_killed_write_resumes_to_the_same_bytes(tmp_path, llama_pair, tiny_pair_dirs, monkeypatch):
    kw = dict(hooks=["resid_pre", "resid_post"], layers=[0, 2], shard_tokens=11, batch_size=1, progress=False)
    clean = write_store(llama_pair, {"chat": encode(llama_pair.tokenizer, PROMPTS)}, tmp_path / "clean", **kw)
    assert len(clean) >= 5
    out = tmp_path / "killed"
    code = KILL_DRIVER.format(after=3, base=str(tiny_pair_dirs["llama"][0]), instruct=str(tiny_pair_dirs["llama"][1]),
                              prompts=PROMPTS, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == -9, res.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == [S.shard_name(0), S.shard_name(1)]
    assert (out / S.shard_name(2)).exists()  # written, never listed: the resume writes it again
    with pytest.raises(StoreError, match="incomplete store"):
        Store(out)
    assert Store(out, allow_partial=True).rows == 22

    calls = []
    real = S._capture
    monkeypatch.setattr(S, "_capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = write_store(llama_pair, {"chat": encode(llama_pair.tokenizer, PROMPTS)}, out, **kw)
    ends = encode(llama_pair.tokenizer, PROMPTS).attention_mask.sum(-1).cumsum(0)
    # Prompts wholly inside the two listed shards are not run again; the one they cut is, by both models.
    assert len(calls) == 2 * int((ends > 22).sum()) < 2 * len(PROMPTS)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in clean.path.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean.path / name).read_bytes(), name
    assert resumed.rows == clean.rows
    calls.clear()
    write_store(llama_pair, {"chat": encode(llama_pair.tokenizer, PROMPTS)}, out, **kw)  # complete: nothing to do
    assert calls == []


def test_other_inputs_are_refused(tmp_path, llama_pair, tiny_pair_dirs):
    batch = encode(llama_pair.tokenizer, PROMPTS[:3])
    kw = dict(layers=[1], shard_tokens=16, progress=False)
    write_store(llama_pair, {"chat": batch}, tmp_path / "s", **kw)
    with pytest.raises(StoreError, match=r"inputs\.tokens"):
        write_store(llama_pair, {"chat": encode(llama_pair.tokenizer, PROMPTS[1:4])}, tmp_path / "s", **kw)
    with pytest.raises(StoreError, match=r"inputs\.tokens"):
        write_store(llama_pair, {"other name": batch}, tmp_path / "s", **kw)
    swapped = {"base": llama_pair.instruct, "instruct": llama_pair.base}
    with pytest.raises(StoreError, match=r"inputs\.models\.base, inputs\.models\.instruct"):
        write_store(swapped, {"chat": batch}, tmp_path / "s", **kw)
    with pytest.raises(StoreError, match=r"spec\.layers"):
        write_store(llama_pair, {"chat": batch}, tmp_path / "s", **{**kw, "layers": [2]})
    with pytest.raises(StoreError, match=r"spec\.dtype"):
        write_store(llama_pair, {"chat": batch}, tmp_path / "s", **kw, dtype="bfloat16")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a store"):
        write_store(llama_pair, {"chat": batch}, tmp_path / "foreign", **kw)


def test_damaged_files_are_detected(tmp_path, llama_pair):
    batch = encode(llama_pair.tokenizer, PROMPTS[:3])
    st = write_store(llama_pair, {"chat": batch}, tmp_path / "s", layers=[1], shard_tokens=10, progress=False)
    path = st.path / S.shard_name(1)
    good = path.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0xFF  # one flipped bit pattern in the activations
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256 mismatch, shard 1"):
        st.shard(1)
    with pytest.raises(StoreError, match="sha256 mismatch"):
        list(st.iter_batches(4))
    # A shard that passes the hash but is not safetensors (its manifest entry rewritten to match).
    path.write_bytes(b"not a safetensors file")
    manifest = json.loads((st.path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = S._sha256(b"not a safetensors file")
    (st.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="not a safetensors file"):
        Store(st.path).shard(1)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        Store(st.path).shard(1)
    path.write_bytes(good)
    stats = st.path / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-8] + bytes(8))
    with pytest.raises(StoreError, match="statistics changed"):
        Store(st.path).mean("base", "resid_post", 1)
    (st.path / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match="not JSON"):
        Store(st.path)
    # A partial store with a damaged shard is not resumed over it.
    out = tmp_path / "partial"
    write_store(llama_pair, {"chat": batch}, out, layers=[1], shard_tokens=10, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / S.shard_name(0)).write_bytes(b"x")
    with pytest.raises(StoreError, match="shard 0"):
        write_store(llama_pair, {"chat": batch}, out, layers=[1], shard_tokens=10, progress=False)


def test_memory_is_bounded_by_one_shard(tmp_path, toy_pair, monkeypatch):
    buffers = []

    class Recorded(S._Buffer):
        def __init__(self):
            super().__init__()
            buffers.append(self)

    monkeypatch.setattr(S, "_Buffer", Recorded)
    shard_tokens, batch_size = 40, 2
    prompts = toy.prompts("harmless", "train")
    n_shards, sizes = [], []
    for n in (4, 8, 16):
        batch = toy_pair.encode(prompts[:n])
        st = write_store(toy_pair, {"p": batch}, tmp_path / str(n), layers=[0, 3], shard_tokens=shard_tokens,
                         batch_size=batch_size, progress=False)
        rows = [s["rows"] for s in st.manifest["shards"]]
        assert rows[:-1] == [shard_tokens] * (len(rows) - 1) and 0 < rows[-1] <= shard_tokens
        n_shards.append(len(st))
        sizes += [(st.path / s["file"]).stat().st_size for s in st.manifest["shards"]]
        # The writer never held more than one shard plus one batch of rows.
        most_per_chunk = max(int(sub.attention_mask.sum()) for _, sub in batch.chunks(batch_size))
        assert buffers[-1].peak <= shard_tokens + most_per_chunk
    assert n_shards[0] < n_shards[1] < n_shards[2]
    # A shard's size: 2 models x 2 layers x shard_tokens x d_model float32 plus labels and statistics.
    d = toy_pair.d_model
    bound = 2 * 2 * shard_tokens * d * 4 + shard_tokens * 13 + 2 * 2 * 2 * d * 8 + 4096
    assert max(sizes) <= bound


def test_bad_input_is_refused_before_any_forward(tmp_path, llama_pair, monkeypatch):
    monkeypatch.setattr(S, "_capture", lambda *a, **k: pytest.fail("a forward ran"))
    batch = encode(llama_pair.tokenizer, PROMPTS[:2])
    out = tmp_path / "s"
    for kwargs, match in [
        (dict(hooks="resid_sideways"), "unknown hook"),
        (dict(hooks=[]), "distinct names"),
        (dict(layers=[7]), "out of range"),
        (dict(dtype=torch.float16), "dtype must be one of"),
        (dict(shard_tokens=0), "shard_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(positions="elsewhere[0]"), "unknown role"),
        (dict(positions=["all", "user[0]"]), "'all' cannot be combined"),
        (dict(positions="system[0]"), "no 'system' tokens"),
        (dict(models=("base", "chat")), "no model named"),
        (dict(models=("base", "base")), "distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_store(llama_pair, {"chat": batch}, out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="not encoded"):
        write_store({"base": llama_pair.base}, {"chat": ["hello"]}, out, models=("base",))
    with pytest.raises(ValueError, match="empty"):
        write_store(llama_pair, {}, out)
    with pytest.raises(ValueError, match="not usable"):
        write_store({"stats": llama_pair.base}, {"chat": batch}, out, models=("stats",))
    with pytest.raises(ValueError, match="ModelPair"):
        write_store(llama_pair.base, {"chat": batch}, out)
    assert not out.exists()
    with pytest.raises(StoreError, match="no manifest.json"):
        Store(tmp_path)


def test_reader_bad_input(tmp_path, llama_pair):
    st = write_store(llama_pair, encode(llama_pair.tokenizer, PROMPTS[:2]), tmp_path / "s", layers=[0, 1],
                     progress=False)
    assert st.sets == ["prompts"]
    for kwargs, match in [(dict(models=["chat"]), "not stored"), (dict(layers=[2]), "not stored"),
                          (dict(hook="resid_pre"), "not stored")]:
        with pytest.raises(ValueError, match=match):
            next(st.iter_batches(4, **kwargs))
    with pytest.raises(ValueError, match="batch_rows"):
        next(st.iter_batches(0))
    with pytest.raises(ValueError, match="is not stored"):
        st.mean("base", "resid_post", 2)
    with pytest.raises(IndexError):
        st.shard(len(st))
    assert "Store(" in repr(st) and "rows=" in repr(st)


def test_offloaded_and_device_mapped_pairs_store_the_same_bytes(tmp_path, llama_pair, tiny_pair_dirs):
    """A pair loaded with `offload=True` (each model moved to the device per batch) or `device_map="auto"`
    (accelerate's placement; all on the CPU here) writes the very shards a plainly loaded pair writes; the screened
    refusal sweep on the device-mapped instruct model scores the same cells to the same numbers."""
    from probes.refusal import Screen, candidates, layer_cutoff, refusal_tokens, sweep

    kw = dict(hooks=["resid_post"], shard_tokens=16, batch_size=2, progress=False)
    plain = write_store(llama_pair, {"chat": PROMPTS}, tmp_path / "plain", **kw)
    for name, extra in (("offload", dict(device="cpu", offload=True)), ("auto", dict(device_map="auto"))):
        pair = load_pair(*tiny_pair_dirs["llama"], **extra)
        st = write_store(pair, {"chat": PROMPTS}, tmp_path / name, **kw)
        assert st.spec == plain.spec and len(st) == len(plain) > 1
        for i in range(len(st)):
            assert (tmp_path / name / S.shard_name(i)).read_bytes() == (tmp_path / "plain" / S.shard_name(i)).read_bytes()
        if name == "auto":
            harm, less = pair.encode(PROMPTS[:3]), pair.encode(PROMPTS[2:])
            ids = refusal_tokens(pair.tokenizer, ["sorry", "cannot"])
            got, ref = ({k: getattr(sweep(m, candidates(m, harm, less, progress=False), harm, less, ids, progress=False,
                                          screen=Screen(kl_max=10.0, induce_min=-100.0), layer_bound=layer_cutoff(3)), k)
                         for k in ("bypass", "kl", "scored")} for m in (pair.instruct, llama_pair.instruct))
            assert torch.equal(got["scored"], ref["scored"]) and bool(ref["scored"].any())
            for k in ("bypass", "kl"):
                torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, equal_nan=True)
