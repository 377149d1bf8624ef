"""A stand-in for GitHub's `gh` CLI: records each call and answers as `gh` does.

GitHub is a remote service we cannot run, so `gh` is the one part of the
branch-and-PR workflow the tests replace. Installed on PATH as `gh` by
`install_gh` (tests/gitrepos.py). Each call appends one JSON line to
`$GH_STANDIN_LOG`: `{"argv", "cwd", "prompt_disabled", "body"}` (`body`: the
text of `--body-file`, read while the file exists). Answers:

- `gh label create NAME [--force]`: exit 0, nothing printed (as gh with --force);
- `gh pr create …`: prints the new PR's URL, `https://github.com/acme/widgets/pull/N`,
  N counting the `pr create` calls in the log;
- `$GH_STANDIN_FAIL=pr` makes `pr create` fail as gh does when the API refuses
  (`pull request create failed: GraphQL: …` on stderr, exit 1);
  `$GH_STANDIN_FAIL=label` does the same for `label create` (HTTP 403).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    log = Path(os.environ["GH_STANDIN_LOG"])
    body = None
    for i, arg in enumerate(argv):
        path = None
        if arg == "--body-file" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--body-file="):
            path = arg.split("=", 1)[1]
        if path is not None:
            body = Path(path).read_text()
    record = {
        "argv": argv,
        "cwd": os.getcwd(),
        "prompt_disabled": os.environ.get("GH_PROMPT_DISABLED"),
        "body": body,
    }
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    fail = os.environ.get("GH_STANDIN_FAIL", "")
    if argv[:2] == ["label", "create"]:
        if fail == "label":
            print("HTTP 403: Resource not accessible by integration", file=sys.stderr)
            return 1
        return 0
    if argv[:2] == ["pr", "create"]:
        if fail == "pr":
            print(
                "pull request create failed: GraphQL: No commits between main and x (createPullRequest)",
                file=sys.stderr,
            )
            return 1
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        n = sum(1 for c in calls if c["argv"][:2] == ["pr", "create"])
        print(f"https://github.com/acme/widgets/pull/{n}")
        return 0
    print(f'unknown command {argv[0] if argv else ""!r} for "gh"', file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
