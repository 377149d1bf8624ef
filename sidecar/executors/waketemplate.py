"""Placeholders inside single quotes in a `wake_command`.

The original pasted each value into the command text, so `--session-id
'${TASK_ID}'` got the id. Here the values are environment variables that
`/bin/sh` expands, and a shell expands nothing between single quotes: the same
template would pass the text `${TASK_ID}` itself. `expand_in_single_quotes`
rewrites each such placeholder as `'"${TASK_ID}"'` (close the quote, expand the
variable inside double quotes, reopen), which gives the value as one literal
piece of that word, as before, and still never parses it as shell code.
"""

from __future__ import annotations

import re

PLACEHOLDERS = ("TASK_ID", "TASK_JSON", "TASK_DESCRIPTION")
_PLACEHOLDER = re.compile(r"\$\{(" + "|".join(PLACEHOLDERS) + r")\}")


def expand_in_single_quotes(template: str) -> tuple[str, int]:
    """(the template with each single-quoted placeholder made to expand, how many).

    A small POSIX sh lexer: backslash escapes outside quotes and inside double
    quotes, single-quoted runs (which nothing escapes), double-quoted runs. Only
    text we know is single-quoted is changed.
    """
    out: list[str] = []
    count = 0
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "\\":
            out.append(template[i : i + 2])
            i += 2
        elif c == "'":
            end = template.find("'", i + 1)
            if end < 0:  # unterminated: sh refuses it; leave it for sh to say so
                out.append(template[i:])
                break
            body, k = _PLACEHOLDER.subn(r"""'"${\1}"'""", template[i + 1 : end])
            count += k
            out.append("'" + body + "'")
            i = end + 1
        elif c == '"':
            j = i + 1
            while j < n and template[j] != '"':
                j += 2 if template[j] == "\\" else 1
            out.append(template[i : j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out), count
