import os
from pathlib import Path

# huggingface_hub reads this when it is imported: set it before anything imports it. Tests never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

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
