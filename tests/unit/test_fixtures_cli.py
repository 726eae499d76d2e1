"""The tiny-checkpoint writers' shared command line (``dev.fixtures`` and ``dev.fixtures_sdxl``)."""

from __future__ import annotations

import pytest

from dev import fixtures, fixtures_sdxl


@pytest.mark.parametrize("main", [fixtures.main, fixtures_sdxl.main], ids=["sd15", "sdxl"])
def test_refuses_a_path_that_is_not_safetensors(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "model.ckpt")])
    assert exc.value.code == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("main", [fixtures.main, fixtures_sdxl.main], ids=["sd15", "sdxl"])
def test_keeps_an_existing_file(main, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"someone's file")
    assert main([str(path)]) == 0
    assert path.read_bytes() == b"someone's file"
    out = capsys.readouterr()
    assert out.out.strip() == str(path)
    assert "exists; leaving it as it is" in out.err


def test_writes_a_missing_file_with_the_asked_seed(tmp_path, capsys):
    calls = []

    def writer(path, seed):
        calls.append((path, seed))
        path.write_bytes(b"x")

    path = tmp_path / "new.safetensors"
    assert fixtures.checkpoint_cli([str(path), "--seed", "3"], "d", "test", writer) == 0
    assert calls == [(path, 3)]
    assert capsys.readouterr().out.strip() == str(path)
