"""PEFT's module-name patterns (``alpha_pattern``, ``rank_pattern``) matched in bounded time.

PEFT picks the first key ``k`` for which ``re.match(rf"(.*\\.)?({k})$", module)`` matches. A key comes from an
adapter_config.json someone else wrote, and Python's backtracking ``re`` takes exponential time on some patterns
(``(a+)+$`` against ``aaaa…b``): a hostile adapter would hang the merge. So the pattern is parsed with Python's
own regex parser (the same syntax, and the same errors for an invalid one) and matched here by simulating its
automaton (Thompson's construction): time proportional to the name's length times the pattern's size, whatever
the pattern. Features whose meaning depends on backtracking (back references,
look-arounds, conditionals, atomic groups, possessive repeats) and flags are refused, as are a pattern longer than
``MAX_PATTERN`` and a name longer than ``MAX_NAME``.
"""

from __future__ import annotations

import functools
import re
from re import _constants as sre  # Python's regex parser and opcodes (3.11+)
from re import _parser

from nbmerge.errors import ModelInputError, shown

MAX_PATTERN = 1000
MAX_NAME = 4096
MAX_COUNT = 1000  # {m,n} with m or a finite n above this is refused
MAX_STATES = 20000  # the pattern's automaton (counted repeats copy their body)


class UnsupportedPattern(ValueError):
    """A pattern nbmerge will not match (invalid, or using a feature outside the supported set)."""


@functools.lru_cache(maxsize=256)
def compile_pattern(key: str) -> "ModulePattern":
    """PEFT's rule for ``key`` parsed and checked; UnsupportedPattern says why it cannot be used."""
    if not isinstance(key, str) or not key:
        raise UnsupportedPattern(f"a pattern must be non-empty text, got {shown(key)}")
    if len(key) > MAX_PATTERN:
        raise UnsupportedPattern(f"a pattern of {len(key)} characters (at most {MAX_PATTERN})")
    try:
        parsed = _parser.parse(rf"(.*\.)?({key})$")
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsupportedPattern(f"not a valid regular expression ({exc})") from None
    if parsed.state.flags & ~(re.UNICODE | sre.SRE_FLAG_UNICODE):
        raise UnsupportedPattern("inline flags such as (?i) are not supported")
    _check(_items_of(parsed))
    return ModulePattern(key, _items_of(parsed))


def _check(items: list) -> None:
    for op, av in items:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY):
            continue
        if op is sre.IN:
            if any(o not in (sre.LITERAL, sre.RANGE, sre.NEGATE, sre.CATEGORY) for o, _ in av):
                raise UnsupportedPattern("this character class is not supported")
        elif op is sre.AT:
            if av not in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING):
                raise UnsupportedPattern(f"the anchor {av} is not supported")
        elif op is sre.BRANCH:
            for branch in av[1]:
                _check(list(branch))
        elif op is sre.SUBPATTERN:
            if av[1] or av[2]:
                raise UnsupportedPattern("inline flags such as (?i:...) are not supported")
            _check(list(av[3]))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = av
            if low > MAX_COUNT or (high is not sre.MAXREPEAT and high > MAX_COUNT):
                raise UnsupportedPattern(f"a repeat count above {MAX_COUNT}")
            _check(list(body))
        else:
            raise UnsupportedPattern(f"{str(op).lower()} (back references, look-arounds, atomic groups and "
                                     f"possessive repeats) is not supported")


_CATEGORIES = {
    sre.CATEGORY_DIGIT: str.isdigit, sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre.CATEGORY_SPACE: str.isspace, sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}


def _in_class(items: list, char: str) -> bool:
    negate = bool(items) and items[0][0] is sre.NEGATE
    found = False
    for op, av in items[1:] if negate else items:
        if op is sre.LITERAL:
            found = ord(char) == av
        elif op is sre.RANGE:
            found = av[0] <= ord(char) <= av[1]
        elif op is sre.CATEGORY:
            test = _CATEGORIES.get(av)
            if test is None:
                raise UnsupportedPattern(f"the character category {av} is not supported")
            found = test(char)
        if found:
            break
    return found != negate


class _State:
    """One NFA state: ``test`` a character predicate (or None), ``anchor`` an AT code (or None), ``following``
    the states it leads to; a state with neither test nor anchor is a split (or, with no successor, the match)."""

    __slots__ = ("test", "anchor", "following")

    def __init__(self, test=None, anchor=None, following=()):
        self.test, self.anchor, self.following = test, anchor, list(following)


class ModulePattern:
    """One compiled key; ``matches(module)`` is PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``, answered by
    simulating the pattern's NFA (Thompson's construction) over the name: time ∝ states × characters."""

    def __init__(self, key: str, items: list):
        self.key = key
        self._count = 0
        self.match = _State()
        self.start = self._sequence(items, self.match)

    def _new(self, **fields) -> _State:
        self._count += 1
        if self._count > MAX_STATES:
            raise UnsupportedPattern(f"the pattern expands to more than {MAX_STATES} states (counted repeats)")
        return _State(**fields)

    def _sequence(self, items: list, following: _State) -> _State:
        for item in reversed(items):
            following = self._item(item, following)
        return following

    def _item(self, item: tuple, following: _State) -> _State:
        op, av = item
        if op is sre.LITERAL:
            return self._new(test=lambda c, code=av: ord(c) == code, following=[following])
        if op is sre.NOT_LITERAL:
            return self._new(test=lambda c, code=av: ord(c) != code, following=[following])
        if op is sre.ANY:
            return self._new(test=lambda c: c != "\n", following=[following])
        if op is sre.IN:
            return self._new(test=lambda c, members=av: _in_class(members, c), following=[following])
        if op is sre.AT:
            return self._new(anchor=av, following=[following])
        if op is sre.BRANCH:
            return self._new(following=[self._sequence(_items_of(branch), following) for branch in av[1]])
        if op is sre.SUBPATTERN:
            return self._sequence(_items_of(av[3]), following)
        low, high, body = av  # MAX_REPEAT / MIN_REPEAT (greed does not change whether it matches)
        body = _items_of(body)
        if high is sre.MAXREPEAT:
            loop = self._new()
            loop.following = [self._sequence(body, loop), following]
            current = loop
        else:
            current = following
            for _ in range(high - low):
                current = self._new(following=[self._sequence(body, current), following])
        for _ in range(low):
            current = self._sequence(body, current)
        return current

    def _closure(self, states: list, at: int, name: str) -> set:
        """The states reachable from ``states`` without reading a character (anchors checked at ``at``)."""
        reached: set = set()
        stack = list(states)
        while stack:
            state = stack.pop()
            if state in reached:
                continue
            reached.add(state)
            if state.test is not None:
                continue
            if state.anchor is not None and not _anchored(state.anchor, at, name):
                continue
            stack.extend(state.following)
        return reached

    def matches(self, name: str) -> bool:
        if len(name) > MAX_NAME:
            raise UnsupportedPattern(f"a module name of {len(name)} characters (at most {MAX_NAME})")
        current = self._closure([self.start], 0, name)
        for at, char in enumerate(name):
            stepped = [state.following[0] for state in current if state.test is not None and state.test(char)]
            current = self._closure(stepped, at + 1, name)
            if not current:
                return False
        return self.match in current


def _anchored(anchor, at: int, name: str) -> bool:
    if anchor in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
        return at == 0
    return at == len(name) or (anchor is sre.AT_END and at == len(name) - 1 and name[-1] == "\n")


def _items_of(subpattern) -> list:
    """The item list of a parsed subpattern."""
    return subpattern.data


def first_match(patterns: dict, name: str, where: str):
    """The value of the first key of ``patterns`` that PEFT's rule matches against module ``name``, or None;
    ModelInputError naming ``where`` and the key for a pattern that cannot be used."""
    for key, value in patterns.items():
        try:
            if compile_pattern(key).matches(name):
                return value
        except UnsupportedPattern as exc:
            raise ModelInputError(f"{where}: pattern {shown(key)}: {exc}") from None
    return None
