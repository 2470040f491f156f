"""Check a base install (`pip install .`, no extras), as `make check-base` makes one.

Run with the base venv's python, from outside the repository (so the source folders are not on
sys.path): the gateway, the CLI and `chatstream status` import and run without torch, and the
install adds no top-level module named gateway, worker or shared.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    if Path.cwd().joinpath("pyproject.toml").exists():
        print("run this from outside the repository", file=sys.stderr)
        return 2
    for name in ("gateway", "worker", "shared"):
        if importlib.util.find_spec(name) is not None:
            print(f"a top-level module {name!r} is installed", file=sys.stderr)
            return 1
    if importlib.util.find_spec("torch") is not None:
        print("torch is installed by the base install", file=sys.stderr)
        return 1
    chatstream = Path(sys.executable).with_name("chatstream")
    for command in (["gateway", "--help"], ["status", "--help"], ["worker", "--help"]):
        subprocess.run([str(chatstream), *command], check=True, stdout=subprocess.DEVNULL)
    from chatstream_cluster.gateway.app import create_app  # noqa: PLC0415
    from chatstream_cluster.shared.settings import GatewaySettings  # noqa: PLC0415

    create_app(GatewaySettings())
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    if heavy:
        print(f"the gateway imported {heavy}", file=sys.stderr)
        return 1
    print(f"base install ok ({os.path.dirname(sys.executable)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
