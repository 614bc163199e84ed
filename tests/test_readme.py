"""The README's two set-up commands stay the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = "pip install torch==2.13.0 && pip install -e . && lorax demo"
TESTS = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert MAIN in readme and TESTS in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert TESTS in ci.splitlines()[-1]
