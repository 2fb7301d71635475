"""The regexes an adapter config may hold (PEFT's alpha_pattern / rank_pattern keys, a string
target_modules or exclude_modules, layers_pattern), kept to a simple subset so that matching them cannot backtrack for long.

Python's re backtracks: `(a+)+$` takes hours on a 40-character module name, and the matching
holds the GIL. A simple pattern is what PEFT users write: literal names, dotted paths, `.`,
`\\d`/`\\w`/`\\s`, character classes, groups with `|`, anchors, lookaheads and lookbehinds
(`^(?!.*vision)`), and quantifiers on a single character, class or `.` (a group may only be
made optional with `?`); no backreferences, named groups or inline flags. What backtracking
can cost is bounded by the ways to try it: `*`, `+` or `{m,}` may take any of a module name's
NAME_CHARS characters, `?` two ways, `{m,n}` n - m + 1, a group each of its alternatives (the
sum of theirs); the pattern's cost is the product along it. A pattern may cost at most
MAX_COST (three `.*` in a row); on module names such a pattern matches in well under a
millisecond; an adapter's patterns together may cost at most MAX_ADAPTER_COST, and each
pattern field hold at most MAX_PATTERN_KEYS keys, which bounds the matching of one adapter.
"""

import math
import re

MAX_PATTERN_CHARS = 256
# Longer than any module path of a Llama-family model ("model.layers.31.self_attn.q_proj").
NAME_CHARS = 64
MAX_COST = NAME_CHARS**3
MAX_ADAPTER_COST = 8 * MAX_COST
MAX_PATTERN_KEYS = 1024

_QUANTIFIER = re.compile(r"(?:[*+?]|\{\d*,?\d*\})[?+]?")
_COUNTS = re.compile(r"\{(\d*)(,?)(\d*)\}")
_OPTIONAL = ("?", "??", "?+")
_CLASS = re.compile(r"\[\^?\]?(?:\\.|[^\]\\])*\]")
_ESCAPED_LETTERS = frozenset("dDwWsSbBAZ")
_GROUP_OPENERS = ("(?:", "(?=", "(?!", "(?<=", "(?<!", "(")


class NotSimple(ValueError):
    """A pattern outside the simple subset; the message says why, for '<pattern> <message>'."""


def pattern_cost(pattern: str) -> int:
    """How many ways matching a simple pattern may try (see the module's docstring); raises
    NotSimple for any other pattern."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise NotSimple(f"has {len(pattern)} characters, more than {MAX_PATTERN_CHARS}")
    cost = _scan(pattern)
    if cost > MAX_COST:
        raise NotSimple(
            f"could backtrack {cost} ways on a module name, more than {MAX_COST} (each *, + or {{m,}} counts "
            f"{NAME_CHARS}, ? 2, a group its alternatives): use fewer quantifiers"
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise NotSimple(f"is not a valid regular expression ({exc.msg} at position {exc.pos})") from None
    except OverflowError:  # a repetition count past what re holds
        raise NotSimple("is not a valid regular expression (a repetition count is too large)") from None
    return cost


def _ways(quantifier: str) -> int:
    """How many lengths a quantifier may try: `?` 2, {m} 1, {m,n} n - m + 1, the rest (and
    any more than that) NAME_CHARS."""
    if quantifier in _OPTIONAL:
        return 2
    counts = _COUNTS.match(quantifier)
    if counts is None or (counts[2] and not (counts[1] and counts[3])):
        return NAME_CHARS
    low, high = int(counts[1] or 0), int(counts[3] or counts[1] or 0)
    return max(1, min(NAME_CHARS, high - low + 1)) if counts[2] else 1


def _scan(pattern: str) -> int:
    """The pattern's cost; raises NotSimple at the first construct outside the subset."""
    groups = [[1]]  # per open group (and the whole pattern): the cost of each alternative so far
    previous = ""  # what a quantifier here would repeat: "atom", "group", or "" for nothing
    i = 0
    while i < len(pattern):
        c = pattern[i]
        quantifier = _QUANTIFIER.match(pattern, i) if previous else None
        if quantifier is not None:
            if previous == "group" and quantifier[0] not in _OPTIONAL:
                raise NotSimple(f"repeats a group at position {i} (only ? may follow a group)")
            groups[-1][-1] *= _ways(quantifier[0])
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
            opener = next(o for o in _GROUP_OPENERS if pattern.startswith(o, i))
            if opener == "(" and pattern.startswith("(?", i):
                raise NotSimple(f"uses (?...) at position {i} (only (?:...) groups and lookarounds: no names or flags)")
            groups.append([1])
            previous, i = "", i + len(opener)
        else:
            if c == "|":
                groups[-1].append(1)
            elif c == ")" and len(groups) > 1:
                alternatives = groups.pop()
                groups[-1][-1] *= sum(alternatives)
            previous = {")": "group", "|": "", "^": "", "$": ""}.get(c, "atom")
            i += 1
    return sum(groups[0]) * math.prod(sum(alternatives) for alternatives in groups[1:])
