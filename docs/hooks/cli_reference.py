"""MkDocs hook: writes the command-line reference (docs/reference/cli.md) from the ``lorax`` argparse parser, so
the page lists every subcommand and option the installed CLI has. The page holds :data:`MARKER` where it goes."""

from __future__ import annotations

import argparse
import functools

MARKER = "<!-- lorax-cli-reference -->"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _option_rows(sub: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | values | default | what it does |", "|---|---|---|---|"]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}`"
        if action.choices:
            values = ", ".join(f"`{c}`" for c in action.choices if c is not True)
        elif action.nargs == 0:
            values = "flag"
        elif not action.option_strings:
            values = ""
        else:
            values = f"`{action.metavar or action.dest.upper()}`"
        if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
            values += " (repeatable)"
        default = "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings \
            else f"`{action.default}`"
        if action.required and action.option_strings:
            default = "required"
        rows.append(f"| {name} | {_cell(values)} | {_cell(default)} | {_cell(action.help or '')} |")
    return rows


def render() -> str:
    """The reference as Markdown: per subcommand, its usage (argparse's own) and a table of its arguments."""
    from diffusers_lorax.cli import build_parser

    parser = build_parser()
    parts = []
    for name, (summary, sub) in _subcommands(parser).items():
        sub.formatter_class = functools.partial(argparse.HelpFormatter, width=100)  # the same on every machine
        usage = sub.format_usage().strip()
        parts += [f"## `lorax {name}`", "", summary[:1].upper() + summary[1:] + ".", "", "```text", usage, "```", ""]
        parts += _option_rows(sub) + [""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (the MkDocs hook signature)
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
