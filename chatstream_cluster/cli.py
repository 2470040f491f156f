"""`chatstream`: the command line of ChatStream Cluster.

Subcommands: `gateway`, `worker`, `up` (local all-in-one), `status` (ops view of the queue),
`feedback` (export the feedback stream), `healthcheck` (for container health checks). Every
setting is a flag and a `CHATSTREAM_*` env var; `chatstream <command> --help` lists them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chatstream_cluster.shared.settings import (
    CommonSettings,
    GatewaySettings,
    UpSettings,
    WorkerSettings,
    add_settings_arguments,
    settings_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatstream",
        description="ChatStream Cluster: stream LLM chat replies from a cluster of GPU workers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    gw = sub.add_parser(
        "gateway",
        help="run one stateless HTTP gateway",
        description=(
            "Serve the OpenAI-compatible API and the ChatStream endpoints; jobs go to the workers "
            "through Redis."
        ),
    )
    add_settings_arguments(gw, GatewaySettings)

    wk = sub.add_parser(
        "worker",
        help="run one generation worker (one per GPU)",
        description=(
            "Load a model, take jobs from Redis, generate with all active sequences batched, "
            "publish tokens. SIGTERM drains: running jobs finish up to --drain-timeout."
        ),
    )
    add_settings_arguments(wk, WorkerSettings)

    up = sub.add_parser(
        "up",
        help="run a local cluster: Redis, workers and a gateway",
        description=(
            "Start an embedded Redis (unless --redis-url is given), the workers (--workers auto: "
            "one per visible CUDA device, else one on CPU) and a gateway; print the URL. "
            "Accepts every gateway and worker flag and passes it on. Ctrl-C stops everything."
        ),
    )
    add_settings_arguments(up, UpSettings)

    st = sub.add_parser(
        "status", help="show queue depth, running jobs and live workers", formatter_class=fmt
    )
    add_settings_arguments(st, CommonSettings)
    st.add_argument("--json", action="store_true", help="print JSON for scripts")
    st.add_argument("--watch", action="store_true", help="refresh in place every --interval")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")

    fb = sub.add_parser(
        "feedback", help="export the /set_feedback stream as JSON lines",
        description="Write the feedback entries (oldest first) as JSON lines; the stream is "
        "trimmed to --feedback-max-entries and --feedback-retention, so export more often "
        "than that. The last id goes to stderr, for the next --after.",
        formatter_class=fmt,
    )
    add_settings_arguments(fb, CommonSettings)
    fb.add_argument("--after", default="", help="export only entries after this id")
    fb.add_argument("--out", default="", help="append to this file (default: stdout)")

    hc = sub.add_parser(
        "healthcheck", help="exit 0 when a gateway or a worker is healthy", formatter_class=fmt
    )
    add_settings_arguments(hc, CommonSettings)
    hc.add_argument("--url", default="", help="gateway URL to GET (e.g. .../healthz)")
    hc.add_argument("--worker-id", default="", help="worker id that must be live in Redis")
    hc.add_argument("--timeout", type=float, default=5.0, help="seconds before failing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gateway":
        from chatstream_cluster.gateway.main import main as run

        return run(settings_from_args(GatewaySettings, args))
    if args.command == "worker":
        from chatstream_cluster.worker.main import main as run

        return run(settings_from_args(WorkerSettings, args))
    if args.command == "up":
        from chatstream_cluster.up import main as run

        return run(settings_from_args(UpSettings, args))
    if args.command == "status":
        from chatstream_cluster.status import main as run

        return run(settings_from_args(CommonSettings, args), args)
    if args.command == "feedback":
        from chatstream_cluster.feedback_export import main as run

        return run(settings_from_args(CommonSettings, args), args)
    if args.command == "healthcheck":
        from chatstream_cluster.healthcheck import main as run

        return run(settings_from_args(CommonSettings, args), args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
