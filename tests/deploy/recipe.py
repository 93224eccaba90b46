"""Reading deploy/: the README's recipe blocks, shell-ish command lines, and the `lorapool`
command line as it is now (introspected from the typer app, never a hard-coded list).

Shared by the static checks (test_deploy_files.py) and the loopback run of the recipe
(test_recipe_loopback.py).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

_BLOCK = re.compile(r"<!--\s*recipe:([\w-]+)\s*-->\s*\n```bash\n(.*?)```", re.S)
_ANY_BASH = re.compile(r"```bash\n(.*?)```", re.S)
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def readme() -> str:
    return (DEPLOY / "README.md").read_text()


def recipe_blocks(text: str | None = None) -> dict[str, str]:
    """`<!-- recipe:NAME -->` → the bash block right after it."""
    blocks: dict[str, str] = {}
    for name, body in _BLOCK.findall(readme() if text is None else text):
        assert name not in blocks, f"recipe block {name} twice"
        blocks[name] = body
    return blocks


def bash_blocks(text: str | None = None) -> list[str]:
    return _ANY_BASH.findall(readme() if text is None else text)


def assignments(block: str) -> dict[str, str]:
    """NAME=value lines of a settings block, values as bash would see them (quotes removed)."""
    out = {}
    for line in block.splitlines():
        m = re.match(r"\s*([A-Z_][A-Z0-9_]*)=(.*)", line)
        if m:
            words = shlex.split(m.group(2), comments=True)
            out[m.group(1)] = words[0] if words else ""
    return out


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile (KEY=value lines; the rest of the line is the value)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def expand(text: str, values: dict[str, str]) -> str:
    """$VAR and ${VAR} replaced where `values` knows them (others left as they are)."""
    return _VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def commands(script: str, values: dict[str, str] | None = None) -> Iterator[list[str]]:
    """The simple commands of a shell snippet, as word lists: continuation lines joined,
    comments dropped, split at `&&`, `||`, `;`, `|` and parentheses (`$(…)` included), the
    variables of `values` expanded first (so an unquoted one splits into words, as in bash)."""
    script = script.replace("\\\n", " ")
    for line in script.splitlines():
        lex = shlex.shlex(expand(line, values or {}), posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        for token in lex:
            if token and set(token) <= set("();|&<>"):
                if words:
                    yield [w.removesuffix("$") for w in words if w != "$"]
                words = []
            else:
                words.append(token)
        if words:
            yield words


# -- the CLI as it is -----------------------------------------------------------------------


def cli() -> Any:
    import typer

    from lorapool.cli import app

    # Typer may carry its own copy of click: the objects below are used by duck typing.
    return typer.main.get_command(app)


def _is_group(cmd: Any) -> bool:
    return isinstance(getattr(cmd, "commands", None), dict)


def _option_names(cmd: Any) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for p in cmd.params:
        if p.param_type_name == "option":
            for o in [*p.opts, *p.secondary_opts]:
                names[o] = p
    return names


def lorapool_invocations(words: list[str]) -> Iterator[list[str]]:
    """The arguments after each `lorapool` executable in a word list (`lorapool`, `exec
    lorapool`, `/opt/lorapool/bin/lorapool`, `docker … exec head lorapool`); a word that
    merely is the user or folder name `lorapool` is not followed by a command or an option."""
    group = cli()
    for i, word in enumerate(words):
        if not (word == "lorapool" or word.endswith("/bin/lorapool")) or i + 1 >= len(words):
            continue
        nxt = words[i + 1]
        if nxt in group.commands or nxt.startswith("--"):
            yield words[i + 1:]


def check_invocation(args: list[str]) -> str:
    """Parse `lorapool ARGS` with the real CLI, without running it; returns the command path.
    Raises AssertionError naming what does not exist (command, option) or does not parse."""
    group = cli()
    path = ["lorapool"]
    rest = list(args)
    root_opts = _option_names(group)
    # Options of the root (--base-url, --api-key) come before the sub-command.
    while rest and rest[0].startswith("--"):
        name = rest[0].split("=", 1)[0]
        assert name in root_opts, f"`lorapool {name}` does not exist ({' '.join(args)})"
        takes_value = not root_opts[name].is_flag and "=" not in rest[0]
        rest = rest[2:] if takes_value else rest[1:]
    while _is_group(group):
        assert rest, f"`{' '.join(path)}` needs a sub-command ({' '.join(args)})"
        sub = group.commands.get(rest[0])
        assert sub is not None, (f"`{' '.join(path)} {rest[0]}` does not exist; known: "
                                 f"{sorted(group.commands)}")
        path.append(rest.pop(0))
        group = sub
    known = _option_names(group)
    for word in rest:
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            assert name in known, (f"`{' '.join(path)}` has no option {name}; it has "
                                   f"{sorted(known)}")
    try:
        # Click parses and converts every value (types, choices, required options) here.
        group.make_context(" ".join(path), list(rest), resilient_parsing=False)
    except Exception as exc:  # noqa: BLE001 - click's UsageError/BadParameter (whose click?)
        if not hasattr(exc, "format_message"):
            raise
        raise AssertionError(f"`{' '.join(path)} {' '.join(rest)}` does not parse: "
                             f"{exc.format_message()}") from exc
    return " ".join(path)


def known_env_vars() -> set[str]:
    """Every LORAPOOL_* variable lorapool reads: the settings table, the CLI's envvars, and
    the donor's token-file variable."""
    from lorapool.service.config import ENV_VARS
    from lorapool.service.pool.donate import TOKEN_FILE_ENV

    found = set(ENV_VARS.values()) | {TOKEN_FILE_ENV}

    def walk(cmd: Any) -> None:
        for p in cmd.params:
            envvar: Any = getattr(p, "envvar", None)
            if isinstance(envvar, str):
                found.add(envvar)
            elif envvar:
                found.update(envvar)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(cli())
    return found
