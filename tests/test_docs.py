"""The documentation site stays true to the code: every public name is in the API reference, the command-line
reference is generated from the parser and lists every subcommand and option, the Python examples on the home and
quickstart pages compile, and every ``lorax`` command the docs show parses with the real parser (not run)."""

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import diffusers_lorax
from diffusers_lorax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages whose Python blocks must compile and whose ``lorax`` commands must parse.
PAGES = ["index.md", "quickstart.md", "guides/cli.md", "guides/distilled.md", "guides/transformers.md"]


def _blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lorax_commands(page: str) -> list[list[str]]:
    commands = []
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["lorax"]:
                    commands.append(words[1:])
    return commands


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "reference" / "api.md").read_text()
    entries = re.findall(r"^::: diffusers_lorax\.(\w+)$", api, flags=re.M)
    assert sorted(entries) == sorted(diffusers_lorax.__all__)  # each once, nothing that is not public
    from diffusers_lorax import plot

    pictures = re.findall(r"^::: diffusers_lorax\.plot\.(\w+)$", api, flags=re.M)
    assert pictures == ["plot_report", "plot_gaps", "PlotDependencyError"] and all(hasattr(plot, n) for n in pictures)


def test_the_quickstart_testbed_example_runs(tmp_path, monkeypatch):
    """The first quickstart block runs offline on the shipped testbed (a copy to the fine-tune, one image), and
    without a deprecation warning of the installed diffusers (0.42: ``dtype=``, not ``torch_dtype=``)."""
    import warnings

    monkeypatch.chdir(tmp_path)
    scope = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(_blocks("quickstart.md", "python")[0], "quickstart.md[0]", "exec"), scope)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and "dtype" in str(w.message)]
    assert deprecated == []
    report, image = scope["report"], scope["image"]
    assert len(report.layers) == 80 and len(report.applied) == 80 and report.adapter_name == "slant"
    assert image.size == (16, 16) and scope["pipe"].get_active_adapters() == ["slant"]


def test_the_cli_reference_lists_every_subcommand_and_option():
    hook = _hook()
    page = (DOCS / "reference" / "cli.md").read_text()
    assert hook.MARKER in page and "docs/hooks/cli_reference.py" in (ROOT / "mkdocs.yml").read_text()
    rendered = hook.on_page_markdown(page, None, None, None)
    assert hook.MARKER not in rendered
    subcommands = hook._subcommands(build_parser())
    assert set(subcommands) == {"transfer", "inspect", "registry", "demo"}
    for name, (_, sub) in subcommands.items():
        assert f"## `lorax {name}`" in rendered
        section = rendered.split(f"## `lorax {name}`")[1].split("\n## ")[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section, (name, option)
            if not action.option_strings:
                assert f"`{action.dest.upper()}`" in section, (name, action.dest)


@pytest.mark.parametrize("page", ["index.md", "quickstart.md", "guides/distilled.md"])
def test_python_blocks_compile(page):
    blocks = _blocks(page, "python")
    assert blocks, f"{page} has no Python example"
    for i, block in enumerate(blocks):
        compile(block, f"{page}[{i}]", "exec")


def test_every_page_and_the_readme_show_valid_python_and_real_lorax_options():
    """Every Python block of every page and of the README compiles; every ``--option`` a shown ``lorax`` command
    (also a usage synopsis with ``[…]``) uses exists on that subcommand."""
    pages = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for path in pages:
        text = path.read_text()
        for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)):
            compile(block, f"{path.name}[{i}]", "exec")
        for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words[:1] != ["lorax"] or len(words) < 2:
                        continue
                    sub = subcommands[words[1]]
                    options = {o for action in sub._actions for o in action.option_strings}
                    for word in words[2:]:
                        option = word.strip("[]").split("=")[0]
                        if option.startswith("--"):
                            assert option in options, f"{path.name}: `lorax {words[1]}` has no option {option}"


def test_every_lorax_command_shown_parses():
    parser = build_parser()
    seen = set()
    for page in PAGES:
        for argv in _lorax_commands(page):
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{page}: `lorax {shlex.join(argv)}` does not parse")
            seen.add(args.command)
    assert seen == {"transfer", "inspect", "registry", "demo"}  # the guides show every subcommand


def test_the_set_up_commands_are_the_readmes():
    readme, index = (ROOT / "README.md").read_text(), (DOCS / "index.md").read_text()
    for block in _blocks("index.md", "bash"):
        assert f"```bash\n{block}```" in readme
    assert "pip install -e . && lorax demo" in index and 'pip install -e ".[test]" && python -m pytest -q' in index


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:")[1]
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r":\s+(\S+\.md)$", nav, flags=re.M))
