"""diffusers_lorax.toy leaves nothing behind: the tokenizer written for each toy pipeline lives in a temporary
directory that is removed once read (issue 23: a test run left ~190 ``/tmp/lorax-tok-*`` folders)."""

import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from diffusers_lorax import toy


def test_toy_pipelines_leave_no_tokenizer_folders(tmp_path, monkeypatch):
    # the temporary directory (/tmp by default) made this test's own: other runs on the machine write to /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    written, write = [], toy.write_tokenizer
    monkeypatch.setattr(toy, "write_tokenizer", lambda folder: written.append(Path(folder)) or write(folder))
    assert list(tmp_path.glob("lorax-tok-*")) == []
    pipe = toy.sd_pipeline(seed=0)
    toy.sdxl_pipeline(seed=0)
    assert [folder.parent for folder in written] == [tmp_path, tmp_path]  # written there, then removed
    assert list(tmp_path.glob("lorax-tok-*")) == []
    # the tokenizer works without its folder and is saved with the pipeline
    ids = pipe.tokenizer("a handwritten digit seven").input_ids
    assert len(ids) == len("ahandwrittendigitseven") + 2  # one id per byte (no merges), start and end
    pipe.tokenizer.save_pretrained(tmp_path / "saved")
    assert CLIPTokenizer.from_pretrained(tmp_path / "saved")("a handwritten digit seven").input_ids == ids


def test_a_given_directory_keeps_the_tokenizer_files(tmp_path):
    tokenizer = toy.byte_tokenizer(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert len(tokenizer) == 514
