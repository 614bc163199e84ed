"""The registry on SQLite and on PostgreSQL (where LORAX_TEST_POSTGRES_URL names a server): exact round trips,
checksums, schema versions, housekeeping, least-recently-used eviction, concurrent processes, SIGKILLed writers."""

import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import time

import pytest
import torch

from diffusers_lorax import Registry, RegistryError, cli, toy, transfer_lora
from diffusers_lorax.registry import default_registry_dir, open_registry
from diffusers_lorax.registry.blobs import as_stored
from diffusers_lorax.registry.location import redact
from diffusers_lorax.subspace import compute_basis
from diffusers_lorax.weights import fingerprint

from helpers import get_bases, put_bases, put_similarities


#: Largest |(ÛᵀÛ − I)_ij| of a stored basis: float32's orthonormality (1e-5) plus float16 rounding's, which moves each
#: column by at most u = 2⁻¹¹ (relative) and so each product u_iᵀu_j by at most 2u + u².
ORTHONORMAL_ATOL = 1e-5 + 2 * 2.0**-11 + 2.0**-22


def basis_of(shape=(40, 24), k=12, seed=0):
    """A random weight's fingerprint and its basis as the registry stores it (exact round trips)."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return fingerprint(W), as_stored(compute_basis(W, k))


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
                assert torch.allclose(basis.U.T @ basis.U, torch.eye(32), atol=ORTHONORMAL_ATOL)
        reg.engine.dispose()
    stats = Registry(directory, url=registry_url).stats()
    assert stats["bases"] >= 20 and stats["bases"] == stats["adapters"] == stats["similarities"]


# -- blob paths read from the database stay inside the blob directory --------------------------------------------------
def _rewrite(reg, table, key, **values):
    """Change a stored row as anyone who can write to the database can."""
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from diffusers_lorax.registry.database import key_column

    with Session(reg.engine) as session, session.begin():
        assert session.execute(update(table).where(key_column(table) == key).values(**values)).rowcount == 1


def _plant_damaged_rows(reg, root, outside):
    """Store bases and an adapter, then point their rows at paths outside the blob directory or at no blob of theirs:
    an absolute path, a ``../`` path, a valid name that is a symbolic link to a file outside (with that file's true
    checksum: a basis one could read), a valid name under a linked folder, a file of the registry directory that is
    not a blob, another row's blob, and an adapter's absolute path. Returns the damaged rows' keys with the path each
    holds, their keys by case, the key and basis of the row whose blob ``other_row`` names, and the files (with their
    bytes) that must stay as they are."""
    import xxhash
    from safetensors.torch import save_file

    from diffusers_lorax.registry.blobs import blob_path
    from diffusers_lorax.registry.database import AdapterRow, BasisRow

    outside.mkdir()
    victim, victim_basis = basis_of((8, 8), 4, seed=100)
    put_bases(reg, {victim: victim_basis})
    [victim_blob] = [p.relative_to(root).as_posix() for p in (root / "bases").rglob("*.safetensors")]
    (outside / "folder").mkdir()
    linked = outside / "linked.safetensors"
    eye = torch.eye(8)[:, :4].contiguous()
    save_file({"U": eye, "S": torch.ones(4), "V": eye.clone()}, linked)
    linked_sum = xxhash.xxh3_128(linked.read_bytes()).hexdigest()
    keys = {name: prefix * 16 for name, prefix in (("absolute", "a1"), ("dotdot", "b2"), ("link", "c3"),
                                                   ("folder", "d4"), ("not_a_blob", "e5"), ("other_row", "f6"))}
    assert victim[:2] not in {key[:2] for key in keys.values()}
    damaged = {
        "absolute": (str(outside / "absolute.txt"), "0" * 32),
        "dotdot": (f"../{outside.name}/dotdot.txt", "0" * 32),
        "link": (blob_path("bases", keys["link"], linked_sum), linked_sum),
        "folder": (blob_path("bases", keys["folder"], "1" * 32), "1" * 32),
        "not_a_blob": ("notes.txt", "0" * 32),
        "other_row": (victim_blob, "0" * 32),
    }
    (outside / "absolute.txt").write_text("absolute")
    (outside / "dotdot.txt").write_text("dotdot")
    (outside / "folder" / damaged["folder"][0].rsplit("/", 1)[1]).write_text("in a linked folder")
    (root / "notes.txt").write_text("a file of the registry directory that is no blob")
    for seed, (name, (blob, checksum)) in enumerate(damaged.items()):
        fp, basis = basis_of((8, 8), 4, seed)
        put_bases(reg, {fp: basis})
        _rewrite(reg, BasisRow, fp, fingerprint=keys[name], blob=blob, checksum=checksum)
    (root / damaged["link"][0]).parent.mkdir(parents=True, exist_ok=True)
    (root / damaged["link"][0]).symlink_to(linked)
    (root / "bases" / keys["folder"][:2]).symlink_to(outside / "folder", target_is_directory=True)
    adapter = "ad" * 16
    with reg.begin() as txn:
        txn.stage_adapter(adapter, {"x.lora_A.weight": torch.ones(2, 2)}, {})
    _rewrite(reg, AdapterRow, adapter, blob=str(outside / "adapter.txt"), checksum="0" * 32)
    (outside / "adapter.txt").write_text("adapter")
    held = {keys[name]: blob for name, (blob, _) in damaged.items()} | {adapter: str(outside / "adapter.txt")}
    keep = {p: p.read_bytes() for p in [*outside.rglob("*.*"), root / "notes.txt"]}
    assert len(keep) == 6
    return held, keys | {"adapter": adapter}, (victim, victim_basis), keep


@pytest.mark.parametrize("operation", ["verify", "prune", "read", "evict", "clear"])
def test_blob_paths_from_the_database_never_leave_the_blob_directory(make_registry, tmp_path, caplog, capsys,
                                                                     operation):
    """Rows naming an absolute path, a ``../`` path, a link out of the directory, a file that is not a blob or another
    row's blob are damaged rows: verify reports them (``unsafe``), prune and a read drop them, evict and clear delete
    them, and no file they name is opened or removed: every file outside, and the file of the registry directory that
    is not a blob, keeps its bytes; the row whose blob a damaged row named still serves its basis."""
    reg, root = make_registry(), tmp_path / "registry"
    damaged, keys, (victim, victim_basis), keep = _plant_damaged_rows(reg, root, tmp_path / "outside")
    link, folder = root / damaged[keys["link"]], root / "bases" / keys["folder"][:2]
    if operation == "verify":
        found = reg.verify()
    elif operation == "prune":
        pruned = reg.prune(older_than=0)
    elif operation == "read":
        stored = reg.find_bases(damaged, 4)
        read = [reg.load_basis(ref, 4) for ref in stored.values()] + [reg.get_adapter(keys["adapter"])]
    elif operation == "evict":
        with reg.lock:
            evicted = reg.evict(0)
    else:
        reg.clear()
    assert {p: p.read_bytes() for p in keep if p.exists()} == keep  # first of all
    stats = reg.stats()
    if operation == "verify":
        assert sorted(found.bad) == sorted(damaged) and found.unsafe == damaged and found.bad_blobs == []
        assert {link, folder} <= set(found.orphans)  # links are garbage: prune removes the link, not its target
        assert stats["bases"] == 7 and stats["adapters"] == 1  # verify changes nothing
        args = ["registry", "verify", "--registry", str(root), "--url", reg.url]
        assert cli.main(args) == 1 and capsys.readouterr().out.count("is not a blob of this registry: not opened") == 7
    elif operation == "prune":
        assert pruned["bad"] == 7 and reg.verify().ok and stats["bases"] == 1 and stats["adapters"] == 0
        assert not link.is_symlink() and not folder.is_symlink()
    elif operation == "read":
        assert sorted(stored) == sorted(k for k in damaged if k != keys["adapter"]) and read == [None] * 7
        assert caplog.text.count("which is not a blob of this registry") == 7
        assert stats["bases"] == 1 and stats["adapters"] == 0  # dropped, as a damaged row is
    elif operation == "evict":
        assert evicted == 8 and stats["bases"] == stats["adapters"] == 0
    else:
        assert stats["bases"] == stats["adapters"] == 0 and not (root / "bases").exists()
    if operation in ("verify", "prune", "read"):
        assert torch.equal(get_bases(reg, [victim], 4)[victim].U, victim_basis.U)


def test_prune_and_clear_remove_links_in_the_blob_directory_not_what_they_point_to(make_registry, tmp_path):
    """``adapters`` and ``staging`` replaced by links to folders outside, ``bases/ee`` a link to a folder, with old
    files there: prune lists each link as garbage and removes the link only; clear too."""
    reg, root = make_registry(), tmp_path / "registry"
    store_bases(reg, 1, (8, 8), 4)
    outside = tmp_path / "outside"
    for name in ("adapters", "staging", "ee"):
        (outside / name).mkdir(parents=True)
        (outside / name / "old.safetensors").write_text(name)
        os.utime(outside / name / "old.safetensors", (0, 0))
    (root / "adapters").symlink_to(outside / "adapters", target_is_directory=True)
    shutil.rmtree(root / "staging", ignore_errors=True)
    (root / "staging").symlink_to(outside / "staging", target_is_directory=True)
    (root / "bases" / "ee").symlink_to(outside / "ee", target_is_directory=True)
    links = [root / "adapters", root / "staging", root / "bases" / "ee"]
    for link in links:
        os.utime(link, (0, 0), follow_symlinks=False)
    found, pruned = reg.verify(), reg.prune(older_than=60)
    assert sorted(p.read_text() for p in outside.rglob("*.safetensors")) == ["adapters", "ee", "staging"]
    assert found.ok and found.orphans == [root / "bases" / "ee", root / "adapters"]
    assert found.leftovers == [root / "staging"] and pruned == {"bad": 0, "garbage": 3, "evicted": 0}
    assert not any(link.is_symlink() for link in links) and reg.verify().ok and reg.stats()["bases"] == 1
    for name in ("adapters", "staging"):
        (root / name).symlink_to(outside / name, target_is_directory=True)
    reg.clear()
    assert not any(link.is_symlink() for link in links) and reg.stats()["bases"] == 0
    assert sorted(p.read_text() for p in outside.rglob("*.safetensors")) == ["adapters", "ee", "staging"]


def test_a_store_id_file_that_holds_no_id_is_refused(tmp_path):
    Registry(tmp_path)
    assert len((tmp_path / "store-id").read_text().strip()) == 32
    (tmp_path / "store-id").write_text("../../etc")
    with pytest.raises(RegistryError, match="does not hold a blob store id .* delete it"):
        Registry(tmp_path)
    assert (tmp_path / "store-id").read_text() == "../../etc"


# -- a database shared by clients whose blob directories differ ----------------------------------------------------
@pytest.fixture
def shared_url(tmp_path, registry_url):
    """A database two registries share: one SQLite file outside both blob directories, or the PostgreSQL one."""
    return registry_url or f"sqlite:///{tmp_path / 'shared.sqlite'}"


def test_clients_with_their_own_blob_directories_keep_each_others_rows(tmp_path, shared_url, caplog):
    """Two clients of one database with different blob directories: what one stored is a miss for the other (its
    directory lacks the blob), never dropped by the other's reads, verify, prune or eviction; each then stores its
    own copy; similarities, which need no blob, are shared."""
    a, b = Registry(tmp_path / "a", url=shared_url), Registry(tmp_path / "b", url=shared_url)
    fp, basis = basis_of((8, 8), 4)
    put_bases(a, {fp: basis})
    with a.begin() as txn:
        txn.stage_adapter("ab" * 16, {"x.lora_A.weight": basis.U.T.contiguous()}, {})
    put_similarities(a, {(fp, fp, 4): (1.0, 1.0)})
    assert get_bases(b, [fp], 4) == {} and b.get_adapter("ab" * 16) is None  # a miss for b ...
    assert b.get_similarities([(fp, fp, 4)]) == {(fp, fp, 4): (1.0, 1.0)}
    assert b.verify().ok and b.verify().checked == 0
    assert b.prune(max_bytes=0, older_than=0) == {"bad": 0, "garbage": 0, "evicted": 0}
    assert torch.equal(get_bases(a, [fp], 4)[fp].U, basis.U) and a.get_adapter("ab" * 16) is not None  # ... kept for a
    assert "missing" not in caplog.text and a.verify().ok and a.stats()["bases"] == 1
    put_bases(b, {fp: basis})  # b recomputed it: stored in its own directory, a's row untouched
    assert torch.equal(get_bases(b, [fp], 4)[fp].U, basis.U) and torch.equal(get_bases(a, [fp], 4)[fp].U, basis.U)
    assert a.stats()["bases"] == b.stats()["bases"] == 1 and a.verify().ok and b.verify().ok
    with b.lock:
        assert b.evict(0) == 1  # b's cap covers b's blobs
    assert torch.equal(get_bases(a, [fp], 4)[fp].U, basis.U) and a.stats()["blob_bytes"] > 0 == b.stats()["blob_bytes"]
    assert a.store != b.store and Registry(tmp_path / "a", url=shared_url).store == a.store  # a store per directory


def test_a_transfer_on_a_shared_database_recomputes_what_its_blob_directory_lacks(folders, tmp_path, shared_url):
    """End to end: a client whose blob directory differs computes the bases once (similarities come from the shared
    database), then serves its own; the first client's cached adapter still serves it; the results are identical."""
    a, b = Registry(tmp_path / "a", url=shared_url), Registry(tmp_path / "b", url=shared_url)
    args = (folders["source"], folders["target"], folders["lora"])
    first, report_a = transfer_lora(*args, method="prolora", registry=a)
    got, report_b = transfer_lora(*args, method="prolora", registry=b)
    n = len(first) // 2
    assert report_a.bases_computed == report_b.bases_computed == 2 * n and not report_b.adapter_cached
    assert report_b.similarities_cached == n
    again, report_b = transfer_lora(*args, method="prolora", registry=b)
    assert report_b.adapter_cached and report_b.bases_computed == 0
    _, report_a = transfer_lora(*args, method="prolora", registry=a)
    assert report_a.adapter_cached and a.verify().ok and b.verify().ok and a.stats()["bases"] == 2 * n
    assert first.keys() == got.keys() == again.keys() and all(torch.equal(first[k], got[k]) for k in first)
