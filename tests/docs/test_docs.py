"""The docs and the code agree: README.md, docs/**/*.md and the deploy files (compose files,
deploy/, Kubernetes or Helm folders when they exist), as they are when the test runs.

- Every code block that can run here runs against a real cluster (tests/docs/snippets.py says
  which blocks and how), or is marked on the line before its fence, with a reason:
  `<!-- docs-test: skip: <why it cannot run here> -->`.
- Every `--flag`, `CHATSTREAM_*` variable and metric they name exists, and every default they
  state is the code's (tests/docs/claims.py says where each counts as named or stated).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import claims
from tests.docs import code_facts as code
from tests.docs.markdown_doc import read_doc
from tests.docs.snippets import Snippet, Target, run, runnable


def doc_paths() -> list[Path]:
    markdown = [code.REPO / "README.md", *sorted((code.REPO / "docs").rglob("*.md"))]
    return markdown + [p for p in code.deploy_files() if p.suffix == ".md"]


def deploy_paths() -> list[Path]:
    return [p for p in code.deploy_files() if p.suffix != ".md"]


SNIPPETS = runnable(doc_paths())


def test_markers_are_well_formed_and_each_gives_a_reason() -> None:
    bad = [problem for path in doc_paths() for problem in read_doc(path).bad_markers]
    assert not bad, bad
    skipped = [f for path in doc_paths() for f in read_doc(path).fences if f.skip]
    assert all(len(f.skip) >= 10 for f in skipped), [(f.where, f.skip) for f in skipped]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_block_runs(snippet: Snippet, docs_target: Target, tmp_path: Path) -> None:
    run(snippet, docs_target, tmp_path)


def test_every_flag_named_exists() -> None:
    problems, checked = claims.flag_problems(doc_paths(), deploy_paths())
    assert checked > 0
    assert not problems, "\n".join(problems)


def test_every_chatstream_variable_named_is_a_setting() -> None:
    problems = claims.env_problems(doc_paths() + deploy_paths())
    assert not problems, "\n".join(problems)


def test_every_metric_named_is_exported() -> None:
    problems, checked = claims.metric_problems(doc_paths(), deploy_paths())
    assert checked > 0
    assert not problems, "\n".join(problems)


def test_every_default_stated_is_the_codes() -> None:
    problems, checked = claims.default_problems(doc_paths())
    assert checked > 0
    assert not problems, "\n".join(problems)


FALSE_DOC = """\
Start it with `chatstream gateway --port 8001 --no-such-flag`, or set the bare
`--nor-this-one`.

```bash
chatstream worker --model mock --bogus-flag 3
make up ARGS="--model mock --not-an-up-flag"
make no-such-target NOPE_VAR=1
python -m bench --scenarios e2e --no-bench-flag
```

`CHATSTREAM_NO_SUCH_SETTING` and `chatstream_no_such_metric_total{reason}`.

| Setting | Default |
| --- | --- |
| `--max-queue` / `CHATSTREAM_MAX_QUEUE` | `65` |

Lines wait for `--queue-timeout` (61 s).
"""
FALSE_COMPOSE = """\
services:
  w:
    command: ["chatstream", "worker", "--device", "cuda:0", "--no-device-flag"]
    environment: {CHATSTREAM_NOT_A_SETTING: "1"}
"""
FALSE_DASHBOARD = '{"panels": [{"description": "sum of --max-batchez",' \
                  ' "targets": [{"expr": "sum(chatstream_made_up)"}]}]}'


def test_the_checks_find_what_is_false(tmp_path: Path) -> None:
    """The checks above have teeth: a doc and deploy files that name what does not exist."""
    doc, compose, dashboard = tmp_path / "false.md", tmp_path / "compose.yml", tmp_path / "d.json"
    doc.write_text(FALSE_DOC)
    compose.write_text(FALSE_COMPOSE)
    dashboard.write_text(FALSE_DASHBOARD)
    flags, _ = claims.flag_problems([doc], [compose, dashboard])
    for wrong in ("gateway` has no flag --no-such-flag", "has no flag --nor-this-one",
                  "worker` has no flag --bogus-flag", "up` has no flag --not-an-up-flag",
                  "`make no-such-target`: no such target", "no variable NOPE_VAR",
                  "bench` has no flag --no-bench-flag", "worker` has no flag --no-device-flag",
                  "has no flag --max-batchez"):
        assert any(wrong in p for p in flags), (wrong, flags)
    assert not any("--port" in p or "--model" in p or "--scenarios" in p for p in flags), flags
    env = claims.env_problems([doc, compose])
    assert {p.split(": ")[1].split()[0] for p in env} == {
        "CHATSTREAM_NO_SUCH_SETTING", "CHATSTREAM_NOT_A_SETTING"}, env
    metrics, _ = claims.metric_problems([doc], [dashboard])
    assert [p.rsplit(" ", 1)[1] for p in metrics] == ["chatstream_no_such_metric_total",
                                                      "chatstream_made_up"], metrics
    defaults, _ = claims.default_problems([doc])
    assert len(defaults) == 2, defaults
    assert any("--max-queue is stated as '65'" in p for p in defaults), defaults
    assert any("--queue-timeout is stated as '61 s'" in p for p in defaults), defaults
