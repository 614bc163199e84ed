"""The SQLite registry: exact round trips, truncation, atomic blobs, clear errors."""

import sqlite3

import pytest
import torch

from diffusers_lorax import Registry, RegistryError
from diffusers_lorax.registry import default_registry_dir
from diffusers_lorax.subspace import compute_basis
from diffusers_lorax.weights import fingerprint


def test_bases_round_trip_exactly_and_truncate(tmp_path):
    reg = Registry(tmp_path)
    W = torch.randn(40, 24)
    b = compute_basis(W, 12)
    fp = fingerprint(W)
    assert reg.get_bases([fp], 12) == {}
    reg.put_bases({fp: b})
    got = Registry(tmp_path).get_bases([fp], 12)[fp]  # a new instance reads what the first wrote
    assert torch.equal(got.U, b.U) and torch.equal(got.S, b.S) and torch.equal(got.V, b.V)
    small = reg.get_bases([fp], 5)[fp]
    assert torch.equal(small.U, b.U[:, :5]) and torch.equal(small.V, b.V[:, :5])
    assert reg.get_bases([fp], 13) == {}  # more vectors than stored is a miss
    assert list((tmp_path / "bases").rglob("*.tmp")) == []
    assert reg.stats()["bases"] == 1 and reg.stats()["blob_bytes"] > 0


def test_blob_names_come_from_fingerprints(tmp_path):
    reg = Registry(tmp_path)
    W = torch.randn(8, 8)
    fp = fingerprint(W)
    reg.put_bases({fp: compute_basis(W, 4)})
    assert [p.name for p in (tmp_path / "bases").rglob("*.safetensors")] == [f"{fp}.safetensors"]


def test_similarities_round_trip(tmp_path):
    reg = Registry(tmp_path)
    reg.put_similarities({("a" * 64, "b" * 64, 4): (0.5, 0.25)})
    assert reg.get_similarities([("a" * 64, "b" * 64, 4), ("a" * 64, "b" * 64, 5)]) == {("a" * 64, "b" * 64, 4): (0.5, 0.25)}


def test_fingerprint_is_content_only():
    W = torch.randn(16, 8)
    assert fingerprint(W) == fingerprint(W.clone())
    assert fingerprint(W) != fingerprint(W.half())
    assert fingerprint(W) != fingerprint(W.reshape(8, 16))
    V = W.clone()
    V[3, 3] = torch.nextafter(V[3, 3], torch.tensor(10.0))
    assert fingerprint(W) != fingerprint(V)
    assert len(fingerprint(W)) == 32


def test_missing_blob_is_a_miss(tmp_path):
    reg = Registry(tmp_path)
    W = torch.randn(8, 8)
    fp = fingerprint(W)
    reg.put_bases({fp: compute_basis(W, 4)})
    next((tmp_path / "bases").rglob("*.safetensors")).unlink()
    assert reg.get_bases([fp], 4) == {}


def test_a_file_that_is_not_a_registry(tmp_path):
    (tmp_path / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot open the registry"):
        Registry(tmp_path)


def test_other_schema_version_is_rebuilt_with_a_warning(tmp_path, caplog):
    reg = Registry(tmp_path)
    W = torch.randn(8, 8)
    fp = fingerprint(W)
    reg.put_bases({fp: compute_basis(W, 4)})
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        db.execute("update meta set value='1' where key='schema_version'")
    reg = Registry(tmp_path)
    assert "schema version 1" in caplog.text and "rebuilding" in caplog.text
    assert reg.stats() == {"bases": 0, "similarities": 0, "adapters": 0, "blob_bytes": 0}
    assert not (tmp_path / "bases").exists()  # no orphan blobs of the old schema
    reg.put_bases({fp: compute_basis(W, 4)})
    assert Registry(tmp_path).stats()["bases"] == 1  # and the rebuilt registry is usable at once


def test_a_changed_blob_fails_its_checksum_and_is_dropped(tmp_path, caplog):
    reg = Registry(tmp_path)
    W = torch.randn(12, 8)
    fp = fingerprint(W)
    reg.put_bases({fp: compute_basis(W, 4)})
    blob = next((tmp_path / "bases").rglob("*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01  # one bit of one float of V
    blob.write_bytes(bytes(data))
    assert reg.get_bases([fp], 4) == {}
    assert "fails its checksum" in caplog.text
    assert reg.stats()["bases"] == 0 and not blob.exists()


def test_adapters_round_trip_with_their_info(tmp_path):
    reg = Registry(tmp_path)
    sd = {"unet.x.lora_A.weight": torch.randn(4, 8), "unet.x.lora_B.weight": torch.randn(8, 4).half()}
    staged = reg.staging()
    reg.stage_adapter(staged, "ab" * 16, sd, {"layers": [{"phi_u": 0.5}]})
    assert reg.get_adapter("ab" * 16) is None  # staged is not visible
    reg.commit(staged)
    got, info = Registry(tmp_path).get_adapter("ab" * 16)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    assert info == {"layers": [{"phi_u": 0.5}]}
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


def test_discarded_staging_leaves_nothing(tmp_path):
    reg = Registry(tmp_path)
    before = reg.stats()
    staged = reg.staging()
    W = torch.randn(8, 8)
    reg.stage_basis(staged, fingerprint(W), compute_basis(W, 4))
    reg.discard(staged)
    assert reg.stats() == before and not staged.directory.exists()


def test_default_dir_env_and_platformdirs(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "x"))
    assert default_registry_dir() == tmp_path / "x"
    monkeypatch.delenv("LORAX_CACHE_DIR")
    from platformdirs import user_cache_dir

    assert str(default_registry_dir()) == user_cache_dir("diffusers-lorax")
