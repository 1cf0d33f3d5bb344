"""Saved activations and directions are checked against their metadata on load; every error names the file."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probes.activations import Activations, _checksum
from probes.directions import Direction, InvalidFileError


def _acts(keep=True):
    t = torch.randn(3, 2, 1, 4)
    return Activations(hooks=["resid_post"], layers=[0, 2], positions=["post_instruction[-1]"], model="m", count=3,
                       sums={"resid_post": t.sum(0, dtype=torch.float64)}, tensors={"resid_post": t} if keep else None,
                       prompts=["a", "b", "c"])


def _rewrite(path, edit_meta=None, edit_data=None, fix_checksum=False):
    with safe_open(str(path), "pt") as f:
        meta, data = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta["probes.activations"])
    if edit_meta:
        edit_meta(m)
    if edit_data:
        edit_data(data)
    meta["probes.activations"] = json.dumps(m)
    if fix_checksum:  # a file written consistently but wrong: the field checks must catch it
        meta["probes.sha256"] = _checksum(meta["probes.activations"], data)
    save_file(data, str(path), metadata=meta)


@pytest.mark.parametrize("keep", [True, False])
def test_activations_round_trip(tmp_path, keep):
    a = _acts(keep)
    b = Activations.load(a.save(tmp_path / "a.safetensors"))
    assert b.layers == a.layers and b.count == 3 and torch.equal(b.mean(), a.mean())


@pytest.mark.parametrize("edit,fix,match", [
    (lambda m: m.update(count=0), False, "checksum mismatch"),
    (lambda m: m.update(count=6), False, "checksum mismatch"),
    (lambda m: m.update(layers=[1, 2]), False, "checksum mismatch"),
    (lambda m: m.update(count=0), True, "count must be a positive integer"),
    (lambda m: m.update(count=4, prompts=["a", "b", "c", "d"]), True, "expected"),
    (lambda m: m.update(layers=[2, 2]), True, "not distinct"),
    (lambda m: m.update(prompts=["a"]), True, "1 prompts for a count of 3"),
])
def test_tampered_activations_are_refused(tmp_path, edit, fix, match):
    path = _acts().save(tmp_path / "a.safetensors")
    _rewrite(path, edit_meta=edit, fix_checksum=fix)
    with pytest.raises(InvalidFileError, match=match) as info:
        Activations.load(path)
    assert str(path) in str(info.value)


def test_activations_sums_must_match_tensors(tmp_path):
    path = _acts().save(tmp_path / "a.safetensors")
    _rewrite(path, edit_data=lambda d: d["sum/resid_post"].mul_(2), fix_checksum=True)
    with pytest.raises(InvalidFileError, match="does not sum"):
        Activations.load(path)


def test_direction_round_trip_and_tampering(tmp_path):
    d = Direction.from_raw(torch.randn(8, dtype=torch.float64), model="m", layer=2, position="post_instruction[-1]")
    path = d.save(tmp_path / "d.safetensors")
    back = Direction.load(path)
    assert torch.equal(back.vector, d.vector) and back.layer == 2
    save_file({"direction": d.vector * 2, "direction/raw": d.raw}, str(path),
              metadata={"direction": json.dumps(d.provenance())})
    with pytest.raises(InvalidFileError, match=f"{path}.*not a unit vector"):
        Direction.load(path)
    other = torch.randn(8)
    save_file({"direction": other / other.norm(), "direction/raw": d.raw}, str(path),
              metadata={"direction": json.dumps(d.provenance())})
    with pytest.raises(InvalidFileError, match="not the direction of its raw"):
        Direction.load(path)
    save_file({"x": d.vector}, str(path))
    with pytest.raises(InvalidFileError, match="key="):
        Direction.load(path)
    with pytest.raises(InvalidFileError, match="no such"):
        Direction.load(tmp_path / "missing.safetensors")
