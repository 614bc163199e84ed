import os
from pathlib import Path

# huggingface_hub reads this when it is imported: set it before anything imports it. Tests never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# One intra-op thread per test process unless the caller sets OMP_NUM_THREADS: the tests run small models, for which
# torch's default (a thread per core) buys nothing, and on cores that other jobs share every operation waits for its
# slowest thread (tests/test_matching.py and test_adapter_cache.py: 251 s on the default two threads, 40 s on one, on
# 2 loaded cores; issue 23). Read when torch is imported, hence here; subprocesses (examples, CLI, registry workers)
# inherit it. Tests of thread counts set theirs explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "realcases"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own default registry directory, never the user's cache."""
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "default-registry"))
    for name in ("LORAX_REGISTRY_URL", "LORAX_REGISTRY_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)


#: A PostgreSQL server to run the registry tests against as well (.ci/run starts one and sets this).
POSTGRES_URL = os.environ.get("LORAX_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request):
    """``None`` (SQLite in the registry directory) or the URL of a fresh PostgreSQL database, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    if not POSTGRES_URL:
        pytest.skip("LORAX_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against (.ci/run starts one)")
    import secrets

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"lorax_test_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def make_registry(tmp_path, registry_url):
    """``make_registry(**kwargs)``: a Registry with blobs in ``tmp_path / "registry"``, on the parametrised backend."""
    from diffusers_lorax import Registry

    return lambda **kwargs: Registry(tmp_path / "registry", url=registry_url, **kwargs)


@pytest.fixture(scope="session")
def realcases() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real LoRA files and configs not found at {SHARED} (../shared/realcases beside the checkout)")
    return SHARED


#: Lines a test module adds (``request.config.stash[SUMMARY].append``) to print at the end of pytest's summary: what
#: the real-file tests cost in the run (tests/test_realcases.py).
SUMMARY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[SUMMARY] = []


def pytest_terminal_summary(terminalreporter, config):
    for line in config.stash[SUMMARY]:
        terminalreporter.write_line(line)
