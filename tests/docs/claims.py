"""The cheap claims of the docs and deploy files, checked against the code: every flag, every
`CHATSTREAM_*` variable, every metric and every stated default. Each `*_problems` function takes
the files to read and returns what is wrong, one line each (empty: all true).

Where a flag counts as named, and for which program:
- a command in a shell block (```bash, sh, shell, console `$` lines) or in an inline code span:
  `chatstream <subcommand> ...` (also after `docker compose exec <service>`) is checked against
  that subcommand, `python -m <module of this repository>` against its `--help`, and
  `make <target> VAR=... ARGS="..."` against the Makefile (targets, variables) and the command
  its ARGS go to; other programs' flags (docker, curl, ...) are theirs, not checked;
- an inline code span that starts with a flag (`--max-batch`, `--stream-interval 0`): a
  `chatstream` flag, of any subcommand. So in prose, name another tool's flag with its command
  (`docker compose up --build`), never bare;
- in deploy files: the `chatstream` commands of YAML `command`/`args`/`test` lists and strings,
  of Dockerfile instructions, and every flag in a JSON string (dashboard descriptions are prose).

A metric is named in a ```promql block, in a dashboard's or rule file's `expr`, and in an
inline code span that starts with it or has it right after a `(` (PromQL).

A default is stated in a table with a "Default" column (the first cell names the flag,
`CHATSTREAM_*` variable, compose variable or generation param), or in text as
"`--flag` (30 s)", "`--flag` (default 5 s)", "`--flag`, default 7 days". A `CHATSTREAM_*` variable
that the compose files interpolate (`${VAR:-default}`) has the compose default; flags have
the code's.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.test_compose import command_words, dockerfile_commands, shell_words
from tests.docs import code_facts as code
from tests.docs.markdown_doc import Doc, read_doc

SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console"}
ENV_VAR = re.compile(r"\bCHATSTREAM_[A-Z0-9_]+\b")
METRIC = re.compile(r"\bchatstream_[a-z0-9_]+\b")
METRIC_IN_SPAN = re.compile(r"(?:^|\()\s*(chatstream_[a-z0-9_]+)(?![\w./-])")
NOT_METRICS = {"chatstream_cluster"}  # the package's import name
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?[^\n]*\n.*?\n\s*\1[ \t]*(?=\n|$)", re.S)


@dataclass(frozen=True)
class Use:
    """A flag named for a program: ("chatstream", sub), ("chatstream",) for any subcommand,
    ("python", "-m", module)."""

    where: str
    program: tuple[str, ...]
    flag: str


def rel(path: Path) -> str:
    """`path` as the problems name it: relative to the repository when inside it."""
    return str(path.relative_to(code.REPO)) if path.is_relative_to(code.REPO) else path.name


# --- flags -----------------------------------------------------------------------------------
def flags_of(words: list[str]) -> list[str]:
    found = []
    for word in words:
        match = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
        if match:
            found.append(match[1])
    return found


def uses_in_command(words: list[str], where: str, problems: list[str]) -> list[Use]:
    """The flags one simple command names for our programs (make's are checked here)."""
    for i, word in enumerate(words):
        rest = words[i + 1:]
        if (word == "chatstream" or word.endswith("/chatstream")) and rest and (
            rest[0] in code.chatstream_commands() or rest[0].startswith("<") or rest[0] == "--help"
        ):  # the program (`useradd ... chatstream` names a user)
            if rest[0] in code.chatstream_commands():
                return [Use(where, ("chatstream", rest[0]), f) for f in flags_of(rest[1:])]
            return [Use(where, ("chatstream",), f) for f in flags_of(rest)]
        if re.fullmatch(r"(\S*/)?python3?(\.\d+)?", word) and words[i + 1:i + 2] == ["-m"]:
            module = words[i + 2] if len(words) > i + 2 else ""
            rest = words[i + 3:]
            if module.split(".")[0] == "chatstream_cluster":
                return uses_in_command(["chatstream", *rest], where, problems)
            if code.is_repository_module(module):
                return [Use(where, ("python", "-m", module), f) for f in flags_of(rest)]
            return []
        if word == "make":
            return uses_in_make(words[i + 1:], where, problems)
    return []


def uses_in_make(words: list[str], where: str, problems: list[str]) -> list[Use]:
    make = code.makefile()
    targets = [w for w in words if "=" not in w and not w.startswith("-")]
    assignments = dict(w.split("=", 1) for w in words if re.match(r"[A-Za-z_]\w*=", w))
    problems += [f"{where}: `make {t}`: no such target in the Makefile"
                 for t in targets if t not in make.targets]
    problems += [f"{where}: `make {v}=...`: the Makefile has no variable {v}"
                 for v in assignments if v not in make.variables]
    uses = []
    for target in targets:
        if "ARGS" in assignments and target in make.args_go_to:
            command = make.args_go_to[target] + shlex.split(assignments["ARGS"])
            uses += uses_in_command(command, where, problems)
    return uses


def shell_commands(script: str, *, console: bool = False) -> list[list[str]]:
    """The simple commands of a shell snippet (heredoc bodies are data, not commands)."""
    if console:
        script = "\n".join(line[2:] for line in script.splitlines() if line.startswith("$ "))
    commands = []
    for line in HEREDOC.sub("", script.replace("\\\n", " ")).splitlines():
        try:
            commands += shell_words(line)
        except ValueError:  # an unbalanced quote: word by word
            commands.append(line.split())
    return commands


def uses_in_span(span: str, where: str, problems: list[str]) -> list[Use]:
    if span.lstrip("[").startswith("--"):  # a bare flag in prose: one of chatstream's
        return [Use(where, ("chatstream",), f) for f in code.FLAG.findall(span)]
    # Alternatives inside [optional] parts (`[--device cpu|cuda:N]`) are not pipes.
    span = re.sub(r"\[[^\]]*\]", lambda m: m[0].replace("|", "/"), span)
    return [u for words in shell_commands(span) for u in uses_in_command(words, where, problems)]


def uses_in_doc(doc: Doc, problems: list[str]) -> list[Use]:
    uses = []
    for fence in doc.fences:
        if fence.lang in SHELL_LANGS:
            for words in shell_commands(fence.code, console=fence.lang == "console"):
                uses += uses_in_command(words, fence.where, problems)
        elif fence.lang in ("yaml", "yml"):
            uses += uses_in_yaml_text(fence.code, fence.where, problems)
    for line, span in doc.spans:
        uses += uses_in_span(span, f"{doc.path.name}:{line}", problems)
    return uses


def yaml_command_lists(node: Any) -> Iterator[Any]:
    """Every compose/Kubernetes command: `command` (+ `args`), `entrypoint`, healthcheck `test`."""
    if isinstance(node, dict):
        command, args = node.get("command"), node.get("args")
        if args is None:
            yield command
        else:  # Kubernetes: the image's program in `command`, its arguments in `args`
            head = shlex.split(command) if isinstance(command, str) else list(command or [])
            yield head + (shlex.split(args) if isinstance(args, str) else list(args))
        for key in ("entrypoint", "test"):
            if key in node:
                yield node[key]
        for value in node.values():
            yield from yaml_command_lists(value)
    elif isinstance(node, list):
        for value in node:
            yield from yaml_command_lists(value)


def uses_in_yaml_text(text: str, where: str, problems: list[str]) -> list[Use]:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:  # a fragment (anchors defined elsewhere) or a template
        return []
    uses = []
    for document in documents:
        for value in yaml_command_lists(document):
            for words in command_words(value, compose=True):
                uses += uses_in_command([str(w) for w in words], where, problems)
    return uses


def json_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from json_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from json_strings(value)


def uses_in_deploy_file(path: Path, problems: list[str]) -> list[Use]:
    where = rel(path)
    if path.suffix in (".yml", ".yaml"):
        return uses_in_yaml_text(path.read_text(), where, problems)
    if "Dockerfile" in path.name:
        return [u for words in dockerfile_commands(path)
                for u in uses_in_command(words, where, problems)]
    if path.suffix == ".json":
        return [Use(where, ("chatstream",), flag)
                for text in json_strings(json.loads(path.read_text()))
                for flag in code.FLAG.findall(text)]
    return []


def accepted(use: Use) -> bool:
    if use.flag == "--help":
        return True
    if use.program[:1] == ("python",):
        return use.flag in code.module_flags(use.program[2])
    if len(use.program) == 2:
        return use.flag in code.chatstream_commands()[use.program[1]]
    return use.flag in code.all_chatstream_flags()


def flag_problems(docs: list[Path], deploy: list[Path]) -> tuple[list[str], int]:
    """(what is wrong, how many flag uses were checked)."""
    problems: list[str] = []
    uses = [u for path in docs for u in uses_in_doc(read_doc(path), problems)]
    uses += [u for path in deploy for u in uses_in_deploy_file(path, problems)]
    for use in uses:
        if not accepted(use):
            program = " ".join(use.program) or "chatstream"
            problems.append(f"{use.where}: `{program}` has no flag {use.flag}")
    return problems, len(uses)


# --- environment variables and metrics ---------------------------------------------------------
def env_problems(paths: list[Path]) -> list[str]:
    known = code.environment_variables()
    return [f"{rel(path)}: {name} is no setting's environment variable"
            for path in paths for name in sorted(set(ENV_VAR.findall(path.read_text())))
            if name not in known]


def expr_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expr_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from expr_strings(value)


def metrics_named(docs: list[Path], deploy: list[Path]) -> list[tuple[str, str]]:
    """(where, metric name) for every metric the docs, dashboards and rule files name."""
    named = []
    for path in docs:
        doc = read_doc(path)
        for fence in doc.fences:
            if fence.lang == "promql":
                named += [(fence.where, m) for m in METRIC.findall(fence.code)]
        for line, span in doc.spans:
            named += [(f"{path.name}:{line}", m) for m in METRIC_IN_SPAN.findall(span)]
    for path in deploy:
        if path.suffix in (".json", ".yml", ".yaml"):
            text = path.read_text()
            try:
                data = json.loads(text) if path.suffix == ".json" else list(
                    yaml.safe_load_all(text))
            except (ValueError, yaml.YAMLError):
                continue
            where = rel(path)
            named += [(where, m) for expr in expr_strings(data) for m in METRIC.findall(expr)]
    return [(where, m) for where, m in named if m not in NOT_METRICS]


def metric_problems(docs: list[Path], deploy: list[Path]) -> tuple[list[str], int]:
    named = metrics_named(docs, deploy)
    exported = code.metric_names()
    return [f"{where}: no process exports {m}" for where, m in named if m not in exported], len(
        named)


# --- defaults --------------------------------------------------------------------------------
UNITS = {"ms": 0.001, "s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60,
         "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600, "day": 86400, "days": 86400}
NUMBER = re.compile(r"(?P<n>\d[\d,]*(?:\.\d+)?)(?:\s*(?P<unit>[a-z]+))?")
STATED_IN_TEXT = re.compile(
    r"`(?P<flag>--[a-z][a-z0-9-]*)`(?:\s+seconds)?(?:\s*\(\s*(?:default\s+)?|,\s+default\s+)"
    r"(?P<value>\d[\d,]*(?:\.\d+)?(?:\s*[a-z]+)?)(?=\s*[),;])")


def stated_values(cell: str) -> list[str] | None:
    """The literal(s) a Default cell states: "`30` s", "`a`, `b`", "`head` (...)", "none";
    None for free text."""
    cell = cell.strip()
    spans = re.fullmatch(r"((?:`[^`]*`\s*,\s*)*`[^`]*`)(?:\s+(?P<unit>[a-z]+))?(?:\s*\(.*\))?",
                         cell)
    if spans:
        unit = f" {spans['unit']}" if spans["unit"] else ""
        return [v + unit for v in re.findall(r"`([^`]*)`", spans[1])]
    if re.fullmatch(r"[\w.:-]+(\s+[a-z]+)?", cell):
        return [cell]
    return None


def same_value(stated: str, default: Any) -> bool:
    stated = stated.strip()
    if stated.lower() in ("none", ""):
        return default in ("", None, [], ())
    if stated.lower() in ("true", "false"):
        return str(default).lower() == stated.lower()
    number = NUMBER.fullmatch(stated)
    if number and (number["unit"] is None or number["unit"] in UNITS):
        value = float(number["n"].replace(",", "")) * UNITS.get(number["unit"] or "s", 1)
        try:
            return not isinstance(default, bool) and abs(float(default) - value) < 1e-9
        except (TypeError, ValueError):
            return False
    return str(default) == stated


def code_defaults(name: str) -> list[Any] | None:
    """What the code (or the compose files, for what they interpolate) gives `name`."""
    if name.startswith("--"):
        return code.flag_defaults(name) or None
    if name in code.compose_defaults():
        return sorted(code.compose_defaults()[name])
    if name.startswith("CHATSTREAM_"):
        return code.env_defaults(name) or None
    if name in code.named_defaults():
        return [code.named_defaults()[name]]
    return None


def default_problems(docs: list[Path]) -> tuple[list[str], int]:
    problems, checked = [], 0

    def check(where: str, name: str, stated: str) -> bool:
        nonlocal checked
        defaults = code_defaults(name)
        if defaults is None:
            return False
        checked += 1
        if not any(same_value(stated, d) for d in defaults):
            problems.append(f"{where}: the default of {name} is stated as {stated!r}; "
                            f"the code's: {' or '.join(map(repr, defaults))}")
        return True

    for path in docs:
        doc = read_doc(path)
        for line, text in doc.inlines:
            for m in STATED_IN_TEXT.finditer(text):
                check(f"{path.name}:{line}", m["flag"], m["value"])
        for table in doc.tables:
            column = next((i for i, h in enumerate(table.header)
                           if h.strip().lower().startswith("default")), None)
            if column is None:
                continue
            setting = next((i for i, h in enumerate(table.header)
                            if h.strip().lower().startswith(("setting", "flag"))), 0)
            table_checked = False
            for row in table.rows:
                # The setting is named in the first column, or in a "Setting" column.
                names = re.findall(r"`([^`]+)`", row[setting] if setting < len(row) else "")
                if not any(n.startswith(("--", "CHATSTREAM_")) for n in names):
                    names = re.findall(r"`([^`]+)`", row[0])
                flags = [n for n in names if n.startswith("--")]
                names = flags or names  # `--flag` / `CHATSTREAM_FLAG`: the same setting
                values = stated_values(row[column]) if column < len(row) else None
                if values is None or len(values) not in (1, len(names)):
                    continue
                for name, value in zip(names, values * len(names), strict=False):
                    table_checked |= check(f"{path.name}:{table.line}", name.split()[0], value)
            if not table_checked:
                problems.append(f"{path.name}:{table.line}: a Default column the test cannot "
                                "check (name a flag, CHATSTREAM_* or compose variable)")
    return problems, checked
