"""The concept encoder's module and file (torch only): shapes, set pooling, the resize rule, the weights file."""

from __future__ import annotations

import json

import pytest
import torch

from dci.files.concept_encoder import EncoderFileError, load_encoder, save_encoder
from dci.method.concept_encoder import ConceptEncoder, EncoderConfig, prepare_images

SMALL = EncoderConfig(width=32, num_tokens=3, image_size=64, patch=4, channels=(16, 32), dim=32, heads=2, layers=1)


def encoder(seed: int = 0) -> ConceptEncoder:
    torch.manual_seed(seed)
    return ConceptEncoder(SMALL).eval()


def test_rows_have_the_text_encoders_width_for_any_number_of_images():
    enc = encoder()
    assert SMALL.grid == 8
    for n in (1, 4):
        assert enc(torch.rand(2, n, 3, 64, 64)).shape == (2, 3, 32)
    with pytest.raises(ValueError, match=r"\[B, N, 3, 64, 64\]"):
        enc(torch.rand(1, 1, 3, 32, 32))


def test_a_set_pools_its_images_and_padding_is_ignored():
    enc = encoder()
    x = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        one = enc(x[:, :1])
        # the same image twice is the same evidence as once (attention over the cells of all images)
        assert torch.allclose(enc(x[:, :1].repeat(1, 2, 1, 1, 1)), one, atol=1e-5)
        # a padded set with its mask equals the unpadded set; the pad's content does not matter
        padded = torch.cat([x[:, :1], torch.rand(1, 1, 3, 64, 64)], dim=1)
        assert torch.allclose(enc(padded, valid=torch.tensor([[True, False]])), one, atol=1e-5)
        assert not torch.allclose(enc(x), one, atol=1e-4)


def test_prepare_images_crops_to_a_square_then_resizes():
    img = torch.rand(2, 96, 160, 4)
    x, note = prepare_images(img, 64)
    assert x.shape == (1, 2, 3, 64, 64)
    assert note == "centre-cropped 160×96 to 96×96; resized 96×96 to 64×64"
    same, note = prepare_images(img[:, :64, :64, :3], 64)
    assert note == "" and torch.equal(same[0], img[:, :64, :64, :3].movedim(-1, 1))
    with pytest.raises(ValueError, match="at least one image"):
        prepare_images(torch.zeros(0, 64, 64, 3), 64)


def test_config_round_trips_and_refuses_unknown_settings():
    assert EncoderConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    with pytest.raises(ValueError, match="unknown concept-encoder settings"):
        EncoderConfig.from_dict({**SMALL.to_dict(), "colour": 1})


def test_weights_file_round_trips_in_fp16(tmp_path):
    enc = encoder(1)
    path = save_encoder(tmp_path / "e.safetensors", enc.state_dict(), SMALL.to_dict(), "sd1", "clip_l",
                        base_fingerprint="abc", extra={"base_name": "toy"})
    f = load_encoder(path)
    assert (f.family, f.text_encoder, f.base_fingerprint, f.metadata["base_name"]) == ("sd1", "clip_l", "abc", "toy")
    assert EncoderConfig.from_dict(f.config) == SMALL
    for k, v in enc.state_dict().items():
        assert torch.equal(f.tensors[k], v.half().float())
    with pytest.raises(FileExistsError):
        save_encoder(path, enc.state_dict(), SMALL.to_dict(), "sd1", "clip_l")


def test_bad_files_are_refused_with_the_reason(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(EncoderFileError, match="does not exist"):
        load_encoder(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "dci-concept"})
    with pytest.raises(EncoderFileError, match="is not a concept encoder"):
        load_encoder(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(1)}, str(newer), metadata={"format": "dci-concept-encoder", "format_version": "9",
                                                           "family": "sd1", "text_encoder": "clip_l", "config": "{}"})
    with pytest.raises(EncoderFileError, match="update the pack"):
        load_encoder(newer)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(EncoderFileError, match="empty"):
        load_encoder(tmp_path / "empty.safetensors")
