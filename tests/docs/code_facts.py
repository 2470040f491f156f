"""What the code says, for the docs test to compare the docs with: the `chatstream` CLI's flags,
environment variables and defaults, the flags of the repository's other `python -m` programs,
the Makefile's targets and variables, the compose files' `${VAR:-default}`s and the metric
names the processes export. Everything is read from the code at run time, never listed here."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from chatstream_cluster.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SETTING_HELP = re.compile(r"\[env (?P<env>CHATSTREAM_\w+); default (?P<default>.*)\]$", re.S)
NO_DEFAULT = object()


@dataclass(frozen=True)
class Option:
    """One flag of one subcommand: its default and its environment variable (settings only)."""

    default: Any
    env: str | None


@functools.cache
def chatstream_commands() -> dict[str, dict[str, Option]]:
    """`chatstream <subcommand>` -> flag -> Option, from the real parser."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    commands: dict[str, dict[str, Option]] = {}
    for name, sub in subparsers.choices.items():
        options = {}
        for action in sub._actions:  # noqa: SLF001
            setting = SETTING_HELP.search(action.help or "")
            if setting:  # a settings field: add_settings_arguments puts env and default here
                option = Option(ast.literal_eval(setting["default"]), setting["env"])
            else:
                default = action.default
                option = Option(NO_DEFAULT if default == argparse.SUPPRESS else default, None)
            for flag in action.option_strings:
                options[flag] = option
        commands[name] = options
    return commands


def all_chatstream_flags() -> set[str]:
    return {flag for options in chatstream_commands().values() for flag in options}


def environment_variables() -> set[str]:
    """Every CHATSTREAM_* variable a subcommand reads."""
    return {o.env for options in chatstream_commands().values() for o in options.values()
            if o.env}


def flag_defaults(flag: str) -> list[Any]:
    """The defaults `flag` has in the subcommands that take it."""
    return [opts[flag].default for opts in chatstream_commands().values()
            if flag in opts and opts[flag].default is not NO_DEFAULT]


def env_defaults(env: str) -> list[Any]:
    return [o.default for options in chatstream_commands().values()
            for o in options.values() if o.env == env]


def is_repository_module(module: str) -> bool:
    """A `python -m` module of this repository (its top-level package is a folder here)."""
    return (REPO / module.split(".")[0]).is_dir()


@functools.cache
def module_flags(module: str) -> frozenset[str]:
    """The flags `python -m <module> --help` lists."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, f"python -m {module} --help failed:\n{proc.stderr[-2000:]}"
    return frozenset(FLAG.findall(proc.stdout))


@dataclass(frozen=True)
class Makefile:
    targets: frozenset[str]
    variables: frozenset[str]
    args_go_to: dict[str, list[str]]  # target -> the command its $(ARGS) are appended to


@functools.cache
def makefile() -> Makefile:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"(?m)^([A-Za-z][\w-]*)\s*:(?!=)", text))
    variables = set(re.findall(r"(?m)^([A-Z][A-Z0-9_]*)\s*[?:]?=", text))
    args_go_to: dict[str, list[str]] = {}
    for block in re.split(r"(?m)^(?=[A-Za-z][\w-]*\s*:(?!=))", text):
        target = re.match(r"([A-Za-z][\w-]*)\s*:", block)
        recipe = re.search(r"(?m)^\t(.*)\$\(ARGS\)", block)
        if target and recipe:
            words = recipe[1].replace("$(BIN)/", "").split()
            args_go_to[target[1]] = words
    return Makefile(frozenset(targets), frozenset(variables), args_go_to)


def deploy_files() -> list[Path]:
    """Compose files, everything under deploy/ and Kubernetes/Helm folders, if any."""
    found = sorted(REPO.glob("docker-compose*.y*ml"))
    for folder in ("deploy", "k8s", "kubernetes", "helm", "charts"):
        found += sorted(p for p in (REPO / folder).rglob("*") if p.is_file())
    return [p for p in found if p.suffix not in (".png", ".jpg", ".svg", ".ico")]


INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?P<op>:?[-?])(?P<value>[^}]*)\}")


@functools.cache
def compose_defaults() -> dict[str, set[str]]:
    """VAR -> what `${VAR:-default}` gives it in the compose files ("required" for `:?`)."""
    defaults: dict[str, set[str]] = {}
    for path in deploy_files():
        if not re.fullmatch(r"docker-compose.*\.ya?ml", path.name):
            continue
        for m in INTERPOLATION.finditer(path.read_text()):
            value = "required" if m["op"].endswith("?") else m["value"]
            defaults.setdefault(m["name"], set()).add(value)
    return defaults


@functools.cache
def metric_names() -> frozenset[str]:
    """Every metric (and sample) name the processes' Prometheus registries can export: the
    `metrics` module of gateway/, worker/ and shared/, whichever exist."""
    names: set[str] = set()
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["_sum", "_count"], "gauge": [""], "info": ["_info"]}
    for package in ("gateway", "worker", "shared"):
        if not (REPO / package / "metrics.py").exists():
            continue
        module = importlib.import_module(f"chatstream_cluster.{package}.metrics")
        for value in vars(module).values():
            if not isinstance(value, CollectorRegistry):
                continue
            for family in value.collect():
                if family.type != "counter":  # a counter's series all carry a suffix
                    names.add(family.name)
                names.update(family.name + s for s in suffixes.get(family.type, []))
                names.update(sample.name for sample in family.samples)
    return frozenset(names)


def named_defaults() -> dict[str, Any]:
    """Defaults the docs state by a name that is no flag: ChatStream's generation params."""
    from chatstream_cluster.gateway.sessions.params import DEFAULT_PARAMS

    return dict(DEFAULT_PARAMS)
