"""The one JSON path implementation: compile the documented subset once, evaluate many times.

Shadow comparison (`mirror.compare`), monitor features, feedback predictions and sample-log
redaction (`log.redact`) all go through here, so a path means the same thing everywhere.

Syntax (docs/reference/configuration.md#json-paths), a path is `$` followed by steps:

- `.key`       a dict key made of letters, digits, `_` and `-` (Unicode letters and digits
               count); any other key needs the bracket form;
- `["key"]`    any dict key, in double or single quotes; backslash escapes as in JSON
  `['key']`    (`\\"`, `\\'`, `\\\\`, `\\/`, `\\b`, `\\f`, `\\n`, `\\r`, `\\t`, `\\uXXXX`);
- `[N]`        list element N, counted from 0. Extra beyond the basic subset: `[-N]` counts from the end,
               as in Python (`[-1]` is the last element);
- `[*]`        every element of a list or every value of a dict, in document order. Extra:
               `.*` is accepted as a spelling of `[*]`.

No whitespace is allowed outside quoted keys. Evaluation never raises: a step that meets the
wrong type (a key on a list, an index on a dict or a string, anything on a scalar) or a
missing key or index simply matches nothing, which callers count as a missing sample
(docs/reference/configuration.md). Only dicts and lists (what json/orjson produce) are containers; tuples and other
objects are leaves.

Invariants the tests check as properties: `find` returns exactly the values at the locations
the path names, in document order; `canonical` re-compiles to the same path; `redact` never
mutates its input.

Hot path: all parsing happens in `compile_path` (cached); a compiled path is a tuple of steps
(`str` key, `int` index, `None` wildcard) walked by a loop, layer by layer; paths without
`[*]` take a straight walk with no intermediate lists. `first` stops at the first match.

Imports: standard library only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any, Final

# A compiled step: a dict key, a list index, or None for the wildcard `[*]`.
_Step = str | int | None

_MISSING: Final[Any] = object()
_ASCII_KEY_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_DIGITS: Final = frozenset("0123456789")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
# int() refuses strings over 4300 digits; no list is anywhere near 10**18 long anyway
_MAX_INDEX_DIGITS: Final = 18


class JsonPathError(ValueError):
    """A path text outside the subset. `position` is the 0-based offset of the problem.

    A ValueError, so pydantic validators report it as a config error at the field's place.
    """

    def __init__(self, text: str, reason: str, position: int) -> None:
        super().__init__(f"bad JSON path {text!r}: {reason} at {position}")
        self.text = text
        self.reason = reason
        self.position = position


def _is_key_char(ch: str) -> bool:
    return ch in _ASCII_KEY_CHARS or (ch >= "\x80" and ch.isalnum())


def _parse(text: str) -> tuple[_Step, ...]:
    """Steps of a path text, or JsonPathError naming the first offending position."""
    if not text.startswith("$"):
        raise JsonPathError(text, "a path starts with '$'", 0)
    steps: list[_Step] = []
    n = len(text)
    i = 1
    while i < n:
        ch = text[i]
        if ch == ".":
            j = i + 1
            if j < n and text[j] == "*":
                steps.append(None)
                i = j + 1
                continue
            while j < n and _is_key_char(text[j]):
                j += 1
            if j == i + 1:
                raise JsonPathError(text, "expected a key after '.' (other keys need [\"...\"])", i + 1)
            steps.append(text[i + 1 : j])
            i = j
        elif ch == "[":
            i = _parse_bracket(text, i, steps)
        else:
            raise JsonPathError(text, f"unexpected {ch!r} (expected '.' or '[')", i)
    return tuple(steps)


def _parse_bracket(text: str, start: int, steps: list[_Step]) -> int:
    """Parse `[...]` opening at `start`; append its step and return the offset after `]`."""
    n = len(text)
    i = start + 1
    if i >= n:
        raise JsonPathError(text, "unclosed '['", start)
    ch = text[i]
    step: _Step
    if ch == "*":
        step = None
        i += 1
    elif ch in "\"'":
        step, i = _parse_string(text, i)
    elif ch == "-" or ch in _DIGITS:
        first_digit = i + 1 if ch == "-" else i
        j = first_digit
        while j < n and text[j] in _DIGITS:
            j += 1
        if j == first_digit:
            if j >= n:
                raise JsonPathError(text, "unclosed '['", start)
            raise JsonPathError(text, "expected digits after '-'", j)
        if j - first_digit > _MAX_INDEX_DIGITS:
            raise JsonPathError(text, "index too large", first_digit)
        step = int(text[i:j])
        i = j
    elif ch == "]":
        raise JsonPathError(text, "empty '[]' (expected an index, '*' or a quoted key)", start)
    else:
        raise JsonPathError(text, f"unexpected {ch!r} (expected an index, '*' or a quoted key)", i)
    if i >= n:
        raise JsonPathError(text, "unclosed '['", start)
    if text[i] != "]":
        raise JsonPathError(text, f"expected ']' but found {text[i]!r}", i)
    steps.append(step)
    return i + 1


def _read_hex4(text: str, i: int) -> int | None:
    """The code unit of the 4 hex digits at text[i:i+4], or None when they are not that."""
    digits = text[i : i + 4]
    if len(digits) != 4 or not all(c in _HEX for c in digits):
        return None
    return int(digits, 16)


def _parse_string(text: str, start: int) -> tuple[str, int]:
    """Decode the quoted key opening at `start`; return it and the offset after the quote."""
    quote = text[start]
    n = len(text)
    parts: list[str] = []
    i = chunk = start + 1
    while True:
        if i >= n:
            raise JsonPathError(text, "unterminated string", start)
        ch = text[i]
        if ch == quote:
            parts.append(text[chunk:i])
            return "".join(parts), i + 1
        if ch != "\\":
            i += 1
            continue
        parts.append(text[chunk:i])
        if i + 1 >= n:
            raise JsonPathError(text, "unterminated string", start)
        esc = text[i + 1]
        if esc in _SIMPLE_ESCAPES:
            parts.append(_SIMPLE_ESCAPES[esc])
            i += 2
        elif esc == "u":
            code = _read_hex4(text, i + 2)
            if code is None:
                raise JsonPathError(text, "bad \\u escape (expected 4 hex digits)", i)
            i += 6
            # a UTF-16 surrogate pair written as two escapes, as JSON encoders emit it
            if 0xD800 <= code < 0xDC00 and text.startswith("\\u", i):
                low = _read_hex4(text, i + 2)
                if low is not None and 0xDC00 <= low < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            parts.append(chr(code))
        else:
            raise JsonPathError(text, f"bad escape '\\{esc}'", i)
        chunk = i


def _format_step(step: _Step) -> str:
    if step is None:
        return "[*]"
    if isinstance(step, int):
        return f"[{step}]"
    if step and all(_is_key_char(c) for c in step):
        return f".{step}"
    # json.dumps escapes exactly `"`, `\` and control characters, all of which _parse_string
    # decodes back; everything else (lone surrogates included) is written as is
    return f"[{json.dumps(step, ensure_ascii=False)}]"


class JsonPath:
    """A compiled path. Build it with `compile_path` (cached); immutable and thread-safe.

    Equality and hashing go by `text`, the path as written; two spellings of the same path
    (`$.a` and `$["a"]`) are different objects with the same `canonical`.
    """

    __slots__ = ("_canonical", "_multi", "_steps", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._steps = _parse(text)
        self._multi = None in self._steps
        self._canonical = "$" + "".join(_format_step(s) for s in self._steps)

    @property
    def text(self) -> str:
        """The path as written in the config."""
        return self._text

    @property
    def canonical(self) -> str:
        """The path in its normal spelling: `.key` where allowed, `["..."]`, `[N]`, `[*]`."""
        return self._canonical

    @property
    def is_multi(self) -> bool:
        """True when the path contains `[*]`, so it can find any number of values."""
        return self._multi

    def __repr__(self) -> str:
        return f"JsonPath({self._text!r})"

    def __str__(self) -> str:
        return self._text

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JsonPath):
            return self._text == other._text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)

    def find(self, doc: Any) -> list[Any]:
        """Every value the path names in `doc`, in document order; [] when there is none.

        The values are the document's own objects (not copies). Never raises.
        """
        if not self._multi:
            value = self._get_single(doc)
            return [] if value is _MISSING else [value]
        # Breadth-first, one step at a time. Expanding each node's children in order keeps
        # the whole layer in document order, so the result is too.
        nodes: list[Any] = [doc]
        for step in self._steps:
            out: list[Any] = []
            if step is None:
                for node in nodes:
                    if isinstance(node, list):
                        out.extend(node)
                    elif isinstance(node, dict):
                        out.extend(node.values())
            elif isinstance(step, str):
                for node in nodes:
                    if isinstance(node, dict):
                        value = node.get(step, _MISSING)
                        if value is not _MISSING:
                            out.append(value)
            else:
                out = [
                    node[step] for node in nodes if isinstance(node, list) and -len(node) <= step < len(node)
                ]
            if not out:
                return out
            nodes = out
        return nodes

    def first(self, doc: Any, default: Any = None) -> Any:
        """The first value `find` would return, or `default`. Stops at the first match."""
        if not self._multi:
            value = self._get_single(doc)
            return default if value is _MISSING else value
        # Depth-first and lazy: stack[i] iterates the candidate nodes reached after i steps,
        # so the first match is found without expanding the rest of any list (O(1) for
        # `$.predictions[*]` however long the list), in document order.
        steps = self._steps
        depth = len(steps)
        stack: list[Iterator[Any]] = [iter((doc,))]
        while stack:
            node = next(stack[-1], _MISSING)
            if node is _MISSING:
                stack.pop()
                continue
            i = len(stack) - 1
            if i == depth:
                return node
            step = steps[i]
            if step is None:
                if isinstance(node, list):
                    stack.append(iter(node))
                elif isinstance(node, dict):
                    stack.append(iter(node.values()))
            elif isinstance(step, str):
                if isinstance(node, dict):
                    value = node.get(step, _MISSING)
                    if value is not _MISSING:
                        stack.append(iter((value,)))
            elif isinstance(node, list) and -len(node) <= step < len(node):
                stack.append(iter((node[step],)))
        return default

    def _get_single(self, doc: Any) -> Any:
        """The one value a path without `[*]` names, or _MISSING."""
        node = doc
        for step in self._steps:
            if isinstance(step, str):
                if not isinstance(node, dict):
                    return _MISSING
                node = node.get(step, _MISSING)
                if node is _MISSING:
                    return _MISSING
            elif isinstance(step, int) and isinstance(node, list) and -len(node) <= step < len(node):
                node = node[step]
            else:
                # an index out of range or on a non-list (a path without [*] has no None step)
                return _MISSING
        return node

    def redact(self, doc: Any, replacement: Any = "[redacted]") -> Any:
        """`doc` with every match replaced by `replacement`; `doc` itself is never changed.

        Only the dicts and lists on the way to a match are copied; every other subtree is
        shared with `doc`, and when nothing matches `doc` itself is returned. So the result
        is for reading and serialising: copy it deeply before changing it in place.
        """
        result = _redact(doc, self._steps, 0, replacement)
        return doc if result is _MISSING else result


def _redact(node: Any, steps: tuple[_Step, ...], i: int, replacement: Any) -> Any:
    """A copy of `node` with the matches of steps[i:] replaced, or _MISSING if none matched.

    Recursion depth is the path's length, not the document's.
    """
    if i == len(steps):
        return replacement
    step = steps[i]
    if step is None:
        if isinstance(node, list):
            new_list: list[Any] | None = None
            for k, child in enumerate(node):
                new = _redact(child, steps, i + 1, replacement)
                if new is not _MISSING:
                    if new_list is None:
                        new_list = list(node)
                    new_list[k] = new
            return _MISSING if new_list is None else new_list
        if isinstance(node, dict):
            new_dict: dict[Any, Any] | None = None
            for key, child in node.items():
                new = _redact(child, steps, i + 1, replacement)
                if new is not _MISSING:
                    if new_dict is None:
                        new_dict = dict(node)
                    new_dict[key] = new
            return _MISSING if new_dict is None else new_dict
        return _MISSING
    if isinstance(step, str):
        if not isinstance(node, dict):
            return _MISSING
        child = node.get(step, _MISSING)
        if child is _MISSING:
            return _MISSING
        new = _redact(child, steps, i + 1, replacement)
        if new is _MISSING:
            return _MISSING
        copied_dict = dict(node)
        copied_dict[step] = new
        return copied_dict
    if not isinstance(node, list) or not -len(node) <= step < len(node):
        return _MISSING
    new = _redact(node[step], steps, i + 1, replacement)
    if new is _MISSING:
        return _MISSING
    copied_list = list(node)
    copied_list[step] = new
    return copied_list


def redact_all(doc: Any, paths: Sequence[JsonPath], replacement: Any = "[redacted]") -> Any:
    """`doc` with the matches of every path replaced; `doc` itself is never changed.

    Paths apply in order, each to the previous result, so a path under one that was already
    replaced finds nothing. As with `JsonPath.redact`, untouched subtrees are shared.
    """
    for path in paths:
        doc = path.redact(doc, replacement)
    return doc


@functools.lru_cache(maxsize=1024)
def compile_path(text: str) -> JsonPath:
    """The compiled path for `text` (cached), or JsonPathError naming the offending position."""
    return JsonPath(text)
