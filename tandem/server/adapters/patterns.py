"""The regexes an adapter config may hold (PEFT's alpha_pattern / rank_pattern keys, a string
target_modules or exclude_modules, layers_pattern), kept to a simple subset so that matching them cannot backtrack for long.

Python's re backtracks: `(a+)+$` takes hours on a 40-character module name, and the matching
holds the GIL. A simple pattern is what PEFT users write: literal names, dotted paths, `.`,
`\\d`/`\\w`/`\\s`, character classes, groups with `|`, anchors, and quantifiers on a single
character, class or `.` (a group may only be made optional with `?`); no backreferences,
lookarounds, named groups or inline flags. Its choice points (each variable quantifier and
each group with alternatives) are counted: backtracking multiplies the ways to try them, so
a pattern may have at most MAX_CHOICES. On module names such a pattern matches in well under
a millisecond; an adapter's patterns together may have at most MAX_ADAPTER_CHOICES, and each
pattern field at most MAX_PATTERN_KEYS keys, which bounds the matching of one adapter.
"""

import re

MAX_PATTERN_CHARS = 256
MAX_CHOICES = 3
MAX_ADAPTER_CHOICES = 32
MAX_PATTERN_KEYS = 1024

_QUANTIFIER = re.compile(r"(?:[*+?]|\{\d*,?\d*\})[?+]?")
_FIXED_COUNT = re.compile(r"\{\d+\}[?+]?")
_OPTIONAL = ("?", "??", "?+")
_CLASS = re.compile(r"\[\^?\]?(?:\\.|[^\]\\])*\]")
_ESCAPED_LETTERS = frozenset("dDwWsSbBAZ")


class NotSimple(ValueError):
    """A pattern outside the simple subset; the message says why, for '<pattern> <message>'."""


def pattern_choices(pattern: str) -> int:
    """The choice points of a simple pattern; raises NotSimple for any other pattern."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise NotSimple(f"has {len(pattern)} characters, more than {MAX_PATTERN_CHARS}")
    choices = _scan(pattern)
    if choices > MAX_CHOICES:
        raise NotSimple(f"has {choices} quantifiers and alternations, more than {MAX_CHOICES}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise NotSimple(f"is not a valid regular expression ({exc.msg} at position {exc.pos})") from None
    except OverflowError:  # a repetition count past what re holds
        raise NotSimple("is not a valid regular expression (a repetition count is too large)") from None
    return choices


def _scan(pattern: str) -> int:
    """Counts choice points; raises NotSimple at the first construct outside the subset."""
    choices = 0
    alternatives = [False]  # per open group (and the whole pattern): has it a '|'?
    previous = ""  # what a quantifier here would repeat: "atom", "group", or "" for nothing
    i = 0
    while i < len(pattern):
        c = pattern[i]
        quantifier = _QUANTIFIER.match(pattern, i) if previous else None
        if quantifier is not None:
            if previous == "group" and quantifier[0] not in _OPTIONAL:
                raise NotSimple(f"repeats a group at position {i} (only ? may follow a group)")
            choices += not _FIXED_COUNT.fullmatch(quantifier[0])
            previous, i = "repeated", quantifier.end()
        elif c == "\\":
            escaped = pattern[i + 1 : i + 2]
            if escaped.isalnum() and escaped not in _ESCAPED_LETTERS:
                raise NotSimple(f"uses the escape \\{escaped} at position {i} (no backreferences or character codes)")
            previous, i = "atom", i + 2
        elif c == "[":
            cls = _CLASS.match(pattern, i)
            previous, i = "atom", (cls.end() if cls else len(pattern))
        elif c == "(":
            if pattern.startswith("(?", i) and not pattern.startswith("(?:", i):
                raise NotSimple(f"uses (?...) at position {i} (only (?:...) groups: no lookarounds, names or flags)")
            alternatives.append(False)
            previous, i = "", i + (3 if pattern.startswith("(?:", i) else 1)
        else:
            if c == "|":
                alternatives[-1] = True
            elif c == ")" and len(alternatives) > 1:
                choices += alternatives.pop()
            previous = {")": "group", "|": "", "^": "", "$": ""}.get(c, "atom")
            i += 1
    return choices + sum(alternatives)
