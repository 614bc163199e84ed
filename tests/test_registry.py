"""The registry on SQLite and on PostgreSQL (where LORAX_TEST_POSTGRES_URL names a server): exact round trips,
checksums, schema versions, housekeeping, least-recently-used eviction, concurrent processes, SIGKILLed writers."""

import multiprocessing
import os
import random
import signal
import sqlite3
import time

import pytest
import torch

from diffusers_lorax import Registry, RegistryError, cli, toy, transfer_lora
from diffusers_lorax.registry import default_registry_dir, open_registry
from diffusers_lorax.registry.location import redact
from diffusers_lorax.subspace import compute_basis
from diffusers_lorax.weights import fingerprint

from helpers import get_bases, put_bases, put_similarities


def basis_of(shape=(40, 24), k=12, seed=0):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return fingerprint(W), compute_basis(W, k)


def store_bases(reg, n, shape, k):
    """Store ``n`` bases of random weights, one commit each; return their fingerprints in order."""
    fps = []
    for seed in range(n):
        fp, b = basis_of(shape, k, seed)
        put_bases(reg, {fp: b})
        fps.append(fp)
    return fps


def test_bases_round_trip_exactly_and_truncate(make_registry, tmp_path):
    reg = make_registry()
    fp, b = basis_of()
    assert get_bases(reg, [fp], 12) == {}
    put_bases(reg, {fp: b})
    got = get_bases(make_registry(), [fp], 12)[fp]  # a new instance reads what the first wrote
    assert torch.equal(got.U, b.U) and torch.equal(got.S, b.S) and torch.equal(got.V, b.V)
    small = get_bases(reg, [fp], 5)[fp]
    assert torch.equal(small.U, b.U[:, :5]) and torch.equal(small.V, b.V[:, :5]) and torch.equal(small.S, b.S[:5])
    assert small.k == 5
    assert get_bases(reg, [fp], 13) == {}  # more vectors than stored is a miss
    assert list((tmp_path / "registry").rglob("*.tmp")) == []
    stats = reg.stats()
    assert stats["bases"] == 1 and stats["blob_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "registry" / "bases").rglob("*.safetensors"))


def test_blob_names_come_from_hashes_only(make_registry, tmp_path):
    reg = make_registry()
    fp, b = basis_of((8, 8), 4)
    put_bases(reg, {fp: b})
    [blob] = list((tmp_path / "registry" / "bases").rglob("*.safetensors"))
    name, checksum = blob.stem.split("-")
    assert name == fp and len(checksum) == 16 and int(checksum, 16) >= 0 and blob.parent.name == fp[:2]


def test_similarities_round_trip(make_registry):
    reg = make_registry()
    put_similarities(reg, {("a" * 32, "b" * 32, 4): (0.5, 0.25)})
    assert reg.get_similarities([("a" * 32, "b" * 32, 4), ("a" * 32, "b" * 32, 5)]) == {("a" * 32, "b" * 32, 4): (0.5, 0.25)}


def test_fingerprint_is_content_only():
    W = torch.randn(16, 8)
    assert fingerprint(W) == fingerprint(W.clone())
    assert fingerprint(W) != fingerprint(W.half())
    assert fingerprint(W) != fingerprint(W.reshape(8, 16))
    V = W.clone()
    V[3, 3] = torch.nextafter(V[3, 3], torch.tensor(10.0))
    assert fingerprint(W) != fingerprint(V)
    assert len(fingerprint(W)) == 32


def test_missing_blob_is_a_miss_and_the_row_goes(make_registry, tmp_path, caplog):
    reg = make_registry()
    fp, b = basis_of((8, 8), 4)
    put_bases(reg, {fp: b})
    next((tmp_path / "registry" / "bases").rglob("*.safetensors")).unlink()
    assert get_bases(reg, [fp], 4) == {}
    assert "missing or fails its checksum" in caplog.text and reg.stats()["bases"] == 0


def test_a_changed_blob_fails_its_checksum_is_dropped_and_recomputed(make_registry, tmp_path, caplog):
    """Corruption end to end: a flipped bit in a stored basis is caught on read and logged, the basis is recomputed,
    and the transfer gives exactly what a fresh registry gives."""
    reg = make_registry()
    source, target = toy.sd_pipeline(seed=0), toy.finetune(toy.sd_pipeline(seed=0), seed=1)
    lora = toy.random_lora(source, rank=2, seed=4)
    transfer_lora(source, target, lora, registry=reg, method="prolora")
    blob = sorted((tmp_path / "registry" / "bases").rglob("*.safetensors"))[0]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01  # one bit of one float
    blob.write_bytes(bytes(data))
    assert not reg.verify().ok
    other = {k: v * 2 if "lora_B" in k else v for k, v in lora.items()}  # not an adapter-cache hit
    got, report = transfer_lora(source, target, other, registry=reg, method="prolora")
    assert "fails its checksum" in caplog.text
    assert report.bases_computed == 1 and reg.verify().ok
    ref, _ = transfer_lora(source, target, other, registry=tmp_path / "fresh", method="prolora")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_engine_is_reused_while_the_database_file_is_the_same(tmp_path, monkeypatch):
    import shutil

    from diffusers_lorax.registry import database

    first = Registry(tmp_path / "r")  # creates the database file
    again = Registry(tmp_path / "r")
    assert Registry(tmp_path / "r").engine is again.engine  # warm: pooled connections and compiled SQL reused
    fp, b = basis_of((8, 8), 4)
    put_bases(again, {fp: b})
    shutil.rmtree(tmp_path / "r")  # the cache deleted by hand between two calls
    fresh = Registry(tmp_path / "r")
    assert fresh.engine is not again.engine and fresh.find_bases([fp], 4) == {}  # a new, empty registry
    put_bases(fresh, {fp: b})
    assert torch.equal(fresh.load_basis(fresh.find_bases([fp], 4)[fp], 4).U, b.U) and first.verify().ok
    for i in range(database.MAX_ENGINES + 2):  # bounded: the oldest are let go
        Registry(tmp_path / f"many{i}")
    assert len(database._ENGINES) <= database.MAX_ENGINES
    kept = Registry(tmp_path / "r").engine
    assert Registry(tmp_path / "r").engine is kept
    parent = os.getpid()
    monkeypatch.setattr(database.os, "getpid", lambda: parent + 1)  # as in a forked child
    child = Registry(tmp_path / "r")
    assert child.engine is not kept and child.find_bases([fp], 4).keys() == {fp}  # its own connections, same data


def test_a_file_that_is_not_a_registry(tmp_path):
    (tmp_path / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot open the registry"):
        Registry(tmp_path)


def test_a_database_of_something_else_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        db.execute("create table customers (id integer primary key)")
    with pytest.raises(RegistryError, match="other tables"):
        Registry(tmp_path)
    with sqlite3.connect(tmp_path / "registry.sqlite") as db:
        assert db.execute("select name from sqlite_master").fetchall() == [("customers",)]  # untouched


def test_other_schema_version_is_rebuilt_with_a_warning(make_registry, tmp_path, caplog):
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from diffusers_lorax.registry.database import MetaRow

    reg = make_registry()
    fp, b = basis_of((8, 8), 4)
    put_bases(reg, {fp: b})
    with Session(reg.engine) as session, session.begin():
        session.execute(update(MetaRow).where(MetaRow.key == "schema_version").values(value="1"))
    reg.engine.dispose()
    reg = make_registry()
    assert "schema version 1" in caplog.text and "rebuilding" in caplog.text
    assert reg.stats() == {"bases": 0, "similarities": 0, "adapters": 0, "calibrations": 0, "correspondences": 0, "blob_bytes": 0}
    assert not (tmp_path / "registry" / "bases").exists()  # no orphan blobs of the old schema
    put_bases(reg, {fp: b})
    assert make_registry().stats()["bases"] == 1  # and the rebuilt registry is usable at once


def test_adapters_round_trip_with_their_info(make_registry, tmp_path):
    reg = make_registry()
    sd = {"unet.x.lora_A.weight": torch.randn(4, 8), "unet.x.lora_B.weight": torch.randn(8, 4).half()}
    txn = reg.begin()
    txn.stage_adapter("ab" * 16, sd, {"layers": [{"phi_u": 0.5}]})
    assert reg.get_adapter("ab" * 16) is None  # staged is not visible
    txn.commit()
    got, info = make_registry().get_adapter("ab" * 16)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    assert info == {"layers": [{"phi_u": 0.5}]}
    assert not txn.directory.exists()


def test_a_failed_commit_removes_the_blobs_it_moved(make_registry, tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    reg = make_registry()
    merged = []

    def fail_second(self, row, *args, **kwargs):
        merged.append(row)
        if len(merged) == 2:  # the first blob has been moved into place by now
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    txn = reg.begin()
    for seed in range(3):
        txn.stage_basis(*basis_of((8, 8), 4, seed))
    monkeypatch.setattr(Session, "merge", fail_second)
    with pytest.raises(RegistryError, match="disk is full"):
        txn.commit()
    monkeypatch.undo()
    assert len(merged) == 2
    assert list((tmp_path / "registry").rglob("*.safetensors")) == []  # neither moved nor staged blobs remain
    assert reg.stats()["bases"] == 0 and reg.verify().ok


def test_discarded_staging_leaves_nothing(make_registry):
    reg = make_registry()
    before = reg.stats()
    fp, b = basis_of((8, 8), 4)
    txn = reg.begin()
    txn.stage_basis(fp, b)
    txn.discard()
    assert reg.stats() == before and not txn.directory.exists()
    with pytest.raises(RuntimeError, match="boom"), reg.begin() as txn:  # as a context manager: an exception discards
        txn.stage_basis(fp, b)
        raise RuntimeError("boom")
    assert reg.stats() == before and not txn.directory.exists()


def test_verify_and_prune(make_registry, tmp_path):
    reg = make_registry()
    store_bases(reg, 3, (16, 8), 4)
    root = tmp_path / "registry"
    assert reg.verify().ok and reg.verify().checked == 3
    blobs = sorted((root / "bases").rglob("*.safetensors"))
    blobs[0].write_bytes(b"damaged")
    orphan = root / "bases" / "ff" / ("f" * 32 + "-0000000000000000.safetensors")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    (root / "staging" / "dead").mkdir(parents=True)
    found = reg.verify()
    assert not found.ok and len(found.bad) == 1 and found.orphans == [orphan]
    assert [p.name for p in found.leftovers] == ["dead"]
    assert reg.prune(older_than=3600) == {"bad": 1, "garbage": 0, "evicted": 0}  # young garbage may be in use
    assert reg.stats()["bases"] == 2 and orphan.exists()
    assert reg.prune(older_than=0) == {"bad": 0, "garbage": 2, "evicted": 0}
    found = reg.verify()
    assert found.ok and found.orphans == [] and found.leftovers == [] and found.checked == 2


def test_least_recently_used_entries_are_evicted_past_the_cap(make_registry):
    reg = make_registry()
    fps = store_bases(reg, 4, (64, 64), 32)
    size = reg.stats()["blob_bytes"] // 4
    # Make the ages unambiguous: fps[0] oldest ... fps[3] newest, then use fps[0].
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from diffusers_lorax.registry.database import BasisRow

    with Session(reg.engine) as session, session.begin():
        for age, fp in enumerate(fps):
            session.execute(update(BasisRow).where(BasisRow.fingerprint == fp).values(last_used=1000.0 + age))
    assert reg.find_bases([fps[0]], 32)  # a read refreshes its last use
    capped = make_registry(max_bytes=2 * size + size // 2)
    fp, b = basis_of((64, 64), 32, 99)
    put_bases(capped, {fp: b})  # five entries past a cap of two and a half: the three least recently used go
    assert set(e["key"] for e in capped.entries()) == {fps[0], fp}
    assert capped.stats()["blob_bytes"] <= capped.max_bytes and capped.verify().ok and not capped.verify().orphans


def test_registry_url_and_paths_never_show_a_password(tmp_path):
    url = "postgresql+psycopg://lorax:s3cr3t-pw@127.0.0.1:1/registry"
    assert redact(url) == "postgresql+psycopg://lorax:***@127.0.0.1:1/registry"
    with pytest.raises(RegistryError) as err:
        Registry(tmp_path, url=url)  # nothing listens on port 1
    assert "s3cr3t" not in str(err.value) and "***" in str(err.value)
    assert "s3cr3t" not in "".join(str(a) for a in err.value.args)


def test_url_strings_select_a_database(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    reg = open_registry(url)
    assert reg.url == url and (tmp_path / "elsewhere.sqlite").exists()
    monkeypatch.setenv("LORAX_REGISTRY_URL", url)
    assert Registry(tmp_path / "blobs").url == url


def test_default_dir_env_and_platformdirs(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "x"))
    assert default_registry_dir() == tmp_path / "x"
    monkeypatch.delenv("LORAX_CACHE_DIR")
    assert "diffusers-lorax" in str(default_registry_dir())


def test_cli_registry_commands(make_registry, tmp_path, capsys):
    reg = make_registry()
    fp, b = basis_of((16, 8), 4)
    put_bases(reg, {fp: b})
    args = ["--registry", str(tmp_path / "registry")] + (["--url", reg.url] if not reg.url.startswith("sqlite") else [])
    assert cli.main(["registry", "path", *args]) == 0
    assert str(tmp_path / "registry") in capsys.readouterr().out
    assert cli.main(["registry", "list", *args]) == 0
    assert f"basis    {fp}" in capsys.readouterr().out
    assert cli.main(["registry", "stats", *args]) == 0
    assert "bases 1" in capsys.readouterr().out
    assert cli.main(["registry", "verify", *args]) == 0
    next((tmp_path / "registry" / "bases").rglob("*.safetensors")).write_bytes(b"damaged")
    assert cli.main(["registry", "verify", *args]) == 1
    assert f"bad: {fp}" in capsys.readouterr().out
    assert cli.main(["registry", "prune", *args]) == 0
    assert cli.main(["registry", "verify", *args]) == 0
    put_bases(reg, {fp: b})
    assert cli.main(["registry", "clear", *args]) == 0
    assert make_registry().stats() == {"bases": 0, "similarities": 0, "adapters": 0, "calibrations": 0, "correspondences": 0, "blob_bytes": 0}


# -- many processes ----------------------------------------------------------------------------------------------------
def _transfer_worker(folders, directory, url, start, out):
    torch.set_num_threads(1)  # the same arithmetic in every process
    start.wait()
    state_dict, report = transfer_lora(folders["source"], folders["target"], folders["lora"], method="prolora",
                                       registry=Registry(directory, url=url))
    out.put({k: v.numpy() for k, v in state_dict.items()})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from safetensors.torch import save_file

    from helpers import save_toy_pair

    root = tmp_path_factory.mktemp("models")
    source = save_toy_pair(root)

    save_file(toy.random_lora(source, rank=4, seed=5), root / "lora.safetensors")
    return {"source": str(root / "source"), "target": str(root / "target"), "lora": str(root / "lora.safetensors")}


def test_eight_processes_on_an_empty_registry(folders, tmp_path, registry_url):
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    directory = tmp_path / "registry"
    procs = [ctx.Process(target=_transfer_worker, args=(folders, directory, registry_url, start, out)) for _ in range(8)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    first = results[0]
    assert all(r.keys() == first.keys() and all((r[k] == first[k]).all() for k in first) for r in results)
    reg = Registry(directory, url=registry_url)
    n = len(first) // 2
    assert reg.stats()["bases"] == 2 * n and reg.stats()["adapters"] == 1  # each basis stored once
    found = reg.verify()
    assert found.ok and found.orphans == [] and found.leftovers == []  # no orphan blobs, no staging left
    assert len(list((directory / "bases").rglob("*.safetensors"))) == 2 * n


def _writer(directory, url, seed, ready):
    torch.set_num_threads(1)
    reg = Registry(directory, url=url)
    i = 0
    while True:  # write until killed
        fp, b = basis_of((96, 64), 32, seed * 100_000 + i)
        with reg.begin() as txn:
            txn.stage_basis(fp, b)
            txn.stage_adapter(fp, {"x.lora_A.weight": b.U.T.contiguous()}, {"layers": []})
            txn.similarities[(fp, fp, 32)] = (1.0, 1.0)
        ready.set()
        i += 1


def test_sigkill_during_writes_never_leaves_a_bad_registry(tmp_path, registry_url):
    """20 writers killed with SIGKILL at random points of their write loop (staging, rename, transaction): each time
    the registry opens, passes verify, and every entry serves what was written with it."""
    ctx = multiprocessing.get_context("forkserver")  # children fork from a server that has imported torch: fast
    ctx.set_forkserver_preload(["torch", "diffusers_lorax.registry"])
    directory = tmp_path / "registry"
    Registry(directory, url=registry_url)
    rng = random.Random(0)
    for trial in range(20):
        ready = ctx.Event()
        p = ctx.Process(target=_writer, args=(directory, registry_url, trial, ready))
        p.start()
        assert ready.wait(120), "the writer never committed"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        reg = Registry(directory, url=registry_url)
        found = reg.verify()
        assert found.ok, f"trial {trial}: rows with bad blobs {found.bad}"
        for entry in reg.entries():
            if entry["kind"] == "basis":  # the basis and the adapter written with it agree
                basis = get_bases(reg, [entry["key"]], 32)[entry["key"]]
                adapter, _ = reg.get_adapter(entry["key"])
                assert torch.equal(adapter["x.lora_A.weight"], basis.U.T)
                assert torch.allclose(basis.U.T @ basis.U, torch.eye(32), atol=1e-5)
        reg.engine.dispose()
    stats = Registry(directory, url=registry_url).stats()
    assert stats["bases"] >= 20 and stats["bases"] == stats["adapters"] == stats["similarities"]
