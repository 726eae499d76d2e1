"""The concept file format: round trip, atomic and safe writes, precise errors for damaged files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dci.files.concept import (
    Concept,
    ConceptFileError,
    load_concept,
    sanitize_name,
    save_concept,
)

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_{}.weight"


def small_concept(**overrides) -> Concept:
    g = torch.Generator().manual_seed(0)
    fields = dict(
        family="sd1", trigger="sks", class_noun="dog",
        kv_deltas={KEY.format("k"): torch.randn(8, 16, generator=g), KEY.format("v"): torch.randn(8, 16, generator=g)},
        tokens={"clip_l": torch.randn(2, 16, generator=g)},
        token_init={"clip_l": torch.randn(2, 16, generator=g)},
        contexts={"clip_l.prefix": torch.randn(4, 3, 16, generator=g), "clip_l.suffix": torch.randn(4, 1, 16, generator=g)},
        base_fingerprint="0123456789abcdef", method="ico", steps=250, training={"lr": 1e-5, "batch": 2},
    )
    fields.update(overrides)
    return Concept(**fields)


def test_save_then_load_gives_identical_tensors_and_metadata(tmp_path):
    c = small_concept()
    path = save_concept(c, tmp_path, "my dog")
    assert path.name == "my dog.safetensors"
    back = load_concept(path)
    for attr in ("kv_deltas", "tokens", "token_init", "contexts"):
        a, b = getattr(c, attr), getattr(back, attr)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (back.family, back.trigger, back.class_noun, back.method, back.steps) == ("sd1", "sks", "dog", "ico", 250)
    assert back.training == {"lr": 1e-5, "batch": 2}
    assert back.base_fingerprint == c.base_fingerprint and back.architecture == c.architecture
    assert back.num_tokens == 2


def test_existing_files_are_never_overwritten_silently(tmp_path):
    save_concept(small_concept(), tmp_path, "a")
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_concept(small_concept(steps=1), tmp_path, "a")
    assert (tmp_path / "a.safetensors").read_bytes() == before
    save_concept(small_concept(steps=1), tmp_path, "a", overwrite=True)
    assert load_concept(tmp_path / "a.safetensors").steps == 1
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary file left behind


def test_a_failed_save_leaves_nothing(tmp_path):
    bad = small_concept(tokens={"clip_l": torch.full((2, 16), float("nan"))})
    with pytest.raises(ConceptFileError, match="NaN"):
        save_concept(bad, tmp_path, "bad")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs/path", "x\\y"])
def test_names_that_are_paths_are_refused(name):
    with pytest.raises(ConceptFileError, match="plain file name"):
        sanitize_name(name)


def test_names_are_made_portable():
    assert sanitize_name("<new1> dog?") == "_new1_ dog_.safetensors"
    assert sanitize_name("CON") == "_CON.safetensors"
    assert sanitize_name("x.safetensors") == "x.safetensors"


def _raw(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_empty_file(tmp_path):
    with pytest.raises(ConceptFileError, match="empty"):
        load_concept(_raw(tmp_path, "e.safetensors", b""))


def test_truncated_file(tmp_path):
    path = save_concept(small_concept(), tmp_path, "t")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConceptFileError, match="truncated"):
        load_concept(path)


def test_corrupted_header(tmp_path):
    path = save_concept(small_concept(), tmp_path, "c")
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(ConceptFileError, match="corrupted"):
        load_concept(path)


def test_not_safetensors_at_all(tmp_path):
    with pytest.raises(ConceptFileError, match="not a valid safetensors"):
        load_concept(_raw(tmp_path, "n.safetensors", b"hello world, this is not a tensor file at all"))


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    path = _raw(tmp_path, "evil.safetensors", pickle.dumps(Evil()))
    with pytest.raises(ConceptFileError):
        load_concept(path)
    assert not marker.exists()
    with pytest.raises(ConceptFileError, match=r"\.safetensors"):
        load_concept(_raw(tmp_path, "evil.pt", pickle.dumps(Evil())))
    assert not marker.exists()


def _resave(tmp_path, tensors, meta, name="m.safetensors"):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def test_missing_metadata(tmp_path):
    c = small_concept()
    meta = c.metadata()
    del meta["class_noun"]
    with pytest.raises(ConceptFileError, match="lacks required metadata: class_noun"):
        load_concept(_resave(tmp_path, c.tensors(), meta))
    with pytest.raises(ConceptFileError, match="not a concept file"):
        load_concept(_resave(tmp_path, c.tensors(), {"format": "lora"}, "l.safetensors"))


def test_wrong_dtype_shape_and_nan(tmp_path):
    c = small_concept()
    t = c.tensors()
    t["token.clip_l"] = torch.ones(2, 16, dtype=torch.int32)
    with pytest.raises(ConceptFileError, match="floating-point"):
        load_concept(_resave(tmp_path, t, c.metadata()))
    t = c.tensors()
    t["token.clip_l"] = torch.ones(16)
    with pytest.raises(ConceptFileError, match=r"expected \[tokens, width\]"):
        load_concept(_resave(tmp_path, t, c.metadata()))
    t = c.tensors()
    t["kv_delta." + KEY.format("k")][0, 0] = float("inf")
    with pytest.raises(ConceptFileError, match="NaN or infinite"):
        load_concept(_resave(tmp_path, t, c.metadata()))


def test_tensors_that_disagree_with_the_architecture_metadata(tmp_path):
    c = small_concept()
    t = c.tensors()
    t["kv_delta." + KEY.format("k")] = torch.zeros(8, 32)
    with pytest.raises(ConceptFileError, match="architecture"):
        load_concept(_resave(tmp_path, t, c.metadata()))


def test_newer_format_versions_ask_for_an_update(tmp_path):
    c = small_concept()
    meta = dict(c.metadata(), format_version="99")
    with pytest.raises(ConceptFileError, match="update the pack"):
        load_concept(_resave(tmp_path, c.tensors(), meta))


def test_unknown_family_and_bad_trigger():
    with pytest.raises(ConceptFileError, match="unknown model family"):
        small_concept(family="flux").validate()
    with pytest.raises(ConceptFileError, match="trigger word"):
        small_concept(trigger="two words").validate()


def test_metadata_is_plain_json_readable_strings(tmp_path):
    path = save_concept(small_concept(), tmp_path, "meta")
    n = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "dci-concept" and meta["format_version"] == "1"
    assert meta["encoders"] == "clip_l" and meta["num_tokens"] == "2"
    assert meta["created"].endswith("Z")
