"""JSON paths: the subset of docs/reference/configuration.md, checked against a naive model on generated documents."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.jsonpath import JsonPath, JsonPathError, compile_path, redact_all

# ---------------------------------------------------------------------------------------
# A naive model. Steps are ("key", str), ("index", int) or ("wild", None); a location is
# the tuple of dict keys and non-negative list indices leading to a value.

Step = tuple[str, Any]

_ASCII_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def model(node: Any, steps: list[Step], loc: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(location, value) of every match, in document order, by plain recursion."""
    if not steps:
        return [(loc, node)]
    (kind, arg), rest = steps[0], steps[1:]
    children: list[tuple[Any, Any]] = []
    if kind == "wild":
        if isinstance(node, list):
            children = list(enumerate(node))
        elif isinstance(node, dict):
            children = list(node.items())
    elif kind == "key":
        if isinstance(node, dict) and arg in node:
            children = [(arg, node[arg])]
    elif isinstance(node, list) and -len(node) <= arg < len(node):
        children = [(arg % len(node), node[arg])]
    return [m for k, child in children for m in model(child, rest, (*loc, k))]


def set_at(doc: Any, loc: tuple[Any, ...], value: Any) -> Any:
    """Set the value at a location in place (the root itself is returned replaced)."""
    if not loc:
        return value
    node = doc
    for k in loc[:-1]:
        node = node[k]
    node[loc[-1]] = value
    return doc


# ---------------------------------------------------------------------------------------
# Strategies

_odd_keys = st.text(alphabet=st.sampled_from("ab-_.[]*$'\"\\ \n\té😀0"), max_size=4)
_keys = st.one_of(st.sampled_from(["a", "b", "c", "x-y", "_0", "0"]), _odd_keys, st.text(max_size=6))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))


def json_docs(keys: st.SearchStrategy[str] = _keys) -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
        max_leaves=25,
    )


_small_keys = st.sampled_from(["a", "b", "c"])
_small_docs = json_docs(_small_keys)
# mostly containers at the top, so that paths have something to walk into
_small_docs_top = st.one_of(
    st.lists(_small_docs, min_size=1, max_size=4),
    st.dictionaries(_small_keys, _small_docs, min_size=1),
    _small_docs,
)
_random_step = st.one_of(
    st.tuples(st.just("key"), _small_keys),
    st.tuples(st.just("index"), st.integers(-3, 3)),
    st.just(("wild", None)),
)
_steps = st.lists(_random_step, max_size=4)


@st.composite
def steps_into(draw: st.DrawFn, doc: Any) -> list[Step]:
    """Steps that follow the document (real keys, real indices, wildcards), maybe one stray at the end."""
    steps: list[Step] = []
    node = doc
    while isinstance(node, (list, dict)) and node and draw(st.integers(0, 5)) > 0:
        keys = list(range(len(node))) if isinstance(node, list) else list(node)
        k = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            steps.append(("wild", None))
        elif isinstance(node, list):
            steps.append(("index", draw(st.sampled_from([k, k - len(node)]))))
        else:
            steps.append(("key", k))
        node = node[k]
    if draw(st.integers(0, 4)) == 0:
        steps.append(draw(_random_step))
    return steps


def any_steps(doc: Any) -> st.SearchStrategy[list[Step]]:
    """Steps unrelated to the document, or steps that mostly follow it."""
    return st.one_of(_steps, steps_into(doc), steps_into(doc))


def _double_quoted(key: str) -> str:
    return '["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'


def _single_quoted(key: str) -> str:
    return "['" + key.replace("\\", "\\\\").replace("'", "\\'") + "']"


def spellings(step: Step) -> st.SearchStrategy[str]:
    """Every way the subset allows to write one step."""
    kind, arg = step
    if kind == "wild":
        return st.sampled_from(["[*]", ".*"])
    if kind == "index":
        forms = [f"[{arg}]"] + ([f"[00{arg}]"] if arg >= 0 else [])
        return st.sampled_from(forms)
    forms = [
        _double_quoted(arg),
        _single_quoted(arg),
        "[" + json.dumps(arg) + "]",  # \uXXXX escapes, surrogate pairs for emoji
        "[" + json.dumps(arg, ensure_ascii=False) + "]",
    ]
    if arg and all(c in _ASCII_KEY_CHARS for c in arg):
        forms.append("." + arg)
    return st.sampled_from(forms)


def spell(data: st.DataObject, steps: list[Step]) -> str:
    return "$" + "".join(data.draw(spellings(s)) for s in steps)


def _ids(values: list[Any]) -> list[int]:
    return [id(v) for v in values]


# ---------------------------------------------------------------------------------------
# Properties


@given(doc=json_docs(), data=st.data())
def test_path_to_a_real_location_finds_exactly_that_value(doc: Any, data: st.DataObject) -> None:
    """A path written to any place in a document finds the value at that place and nothing else."""
    node, steps = doc, []
    while isinstance(node, (list, dict)) and node and data.draw(st.booleans()):
        if isinstance(node, list):
            i = data.draw(st.integers(0, len(node) - 1))
            steps.append(("index", data.draw(st.sampled_from([i, i - len(node)]))))
            node = node[i]
        else:
            key = data.draw(st.sampled_from(list(node)))
            steps.append(("key", key))
            node = node[key]
    path = compile_path(spell(data, steps))
    found = path.find(doc)
    assert len(found) == 1
    assert found[0] is node
    assert path.first(doc, default=object()) is node
    assert not path.is_multi


@given(doc=_small_docs_top, data=st.data())
def test_find_matches_the_model_and_never_raises(doc: Any, data: st.DataObject) -> None:
    """Any valid path on any document finds exactly what a plain recursive walk finds, in order."""
    steps = data.draw(any_steps(doc))
    path = compile_path(spell(data, steps))
    expected = [value for _, value in model(doc, steps)]
    assert _ids(path.find(doc)) == _ids(expected)
    missing = object()
    assert path.first(doc, default=missing) is (expected[0] if expected else missing)
    assert path.is_multi == any(kind == "wild" for kind, _ in steps)


@given(doc=json_docs(), data=st.data())
def test_find_never_raises_on_arbitrary_documents(doc: Any, data: st.DataObject) -> None:
    """A path over a document of unexpected shape yields a (maybe empty) list, never an error."""
    path = compile_path(spell(data, data.draw(any_steps(doc))))
    assert isinstance(path.find(doc), list)
    path.first(doc)
    path.redact(doc)


@given(doc=json_docs(), data=st.data())
def test_canonical_spelling_is_stable(doc: Any, data: st.DataObject) -> None:
    """Printing a compiled path and compiling that again gives the same text and the same matches."""
    odd_steps = st.lists(st.one_of(st.tuples(st.just("key"), _keys), _random_step), max_size=5)
    steps = data.draw(st.one_of(odd_steps, steps_into(doc)))
    path = compile_path(spell(data, steps))
    again = compile_path(path.canonical)
    assert again.canonical == path.canonical
    assert compile_path(again.canonical).canonical == path.canonical
    assert _ids(again.find(doc)) == _ids(path.find(doc)) == _ids([v for _, v in model(doc, steps)])


@given(doc=_small_docs_top, data=st.data())
def test_redact_replaces_matches_and_leaves_the_input_alone(doc: Any, data: st.DataObject) -> None:
    """Redaction puts the replacement at every match, keeps the rest equal and never edits the input."""
    steps = data.draw(any_steps(doc))
    path = compile_path(spell(data, steps))
    before = copy.deepcopy(doc)
    marker = object()
    redacted = path.redact(doc, replacement=marker)
    assert doc == before
    matches = model(before, steps)
    expected = copy.deepcopy(before)
    for loc, _ in matches:
        expected = set_at(expected, loc, marker)
    assert redacted == expected
    assert path.find(redacted) == [marker] * len(matches)
    if not matches:
        assert redacted is doc


@given(doc=_small_docs_top, data=st.data())
def test_redact_all_equals_redacting_one_path_after_another(doc: Any, data: st.DataObject) -> None:
    """Redacting with several paths is the same as applying them in turn, with the input untouched."""
    a = compile_path(spell(data, data.draw(any_steps(doc))))
    b = compile_path(spell(data, data.draw(any_steps(doc))))
    before = copy.deepcopy(doc)
    assert redact_all(doc, [a, b]) == b.redact(a.redact(doc))
    assert doc == before


_SUFFIXES = [
    ("[", 0, "unclosed '['"),
    ("[1", 0, "unclosed '['"),
    ("[*", 0, "unclosed '['"),
    ('["a"', 0, "unclosed '['"),
    ("[]", 0, "empty '[]'"),
    ("[x]", 1, "unexpected 'x'"),
    ("[1x]", 2, "expected ']'"),
    ("[-]", 2, "expected digits"),
    ("['a", 1, "unterminated string"),
    ('["\\q"]', 2, "bad escape"),
    ('["\\u12"]', 2, "bad \\u escape"),
    (".", 1, "expected a key"),
    ("..a", 1, "expected a key"),
    (".+", 1, "expected a key"),
    (" ", 0, "unexpected ' '"),
    ("!", 0, "unexpected '!'"),
]


@given(steps=_steps, data=st.data(), suffix=st.sampled_from(_SUFFIXES))
def test_broken_paths_name_the_offending_position(
    steps: list[Step], data: st.DataObject, suffix: tuple[str, int, str]
) -> None:
    """A valid path followed by a typo is rejected with a message that points at the typo."""
    valid = spell(data, steps)
    tail, offset, reason = suffix
    text = valid + tail
    with pytest.raises(JsonPathError) as caught:
        compile_path(text)
    err = caught.value
    assert err.position == len(valid) + offset
    assert err.text == text
    assert reason in err.reason
    assert str(err) == f"bad JSON path {text!r}: {err.reason} at {err.position}"


@given(text=st.one_of(st.text(), st.text(alphabet=st.sampled_from("$.[]*'\"\\-019ab u"), max_size=12)))
def test_any_text_either_compiles_or_raises_a_path_error(text: str) -> None:
    """Whatever text a config holds, compiling gives a path or a JsonPathError positioned in the text."""
    try:
        path = compile_path(text)
    except JsonPathError as err:
        error = err
    else:
        assert compile_path(path.canonical).canonical == path.canonical
        return
    assert 0 <= error.position <= len(text)
    assert str(error).endswith(f" at {error.position}")
    assert isinstance(error, ValueError)


# ---------------------------------------------------------------------------------------
# Examples


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$.a[", "bad JSON path '$.a[': unclosed '[' at 3"),
        ("", "bad JSON path '': a path starts with '$' at 0"),
        ("predictions[0]", "bad JSON path 'predictions[0]': a path starts with '$' at 0"),
        ("$.", "bad JSON path '$.': expected a key after '.' (other keys need [\"...\"]) at 2"),
        ("$.a..b", "bad JSON path '$.a..b': expected a key after '.' (other keys need [\"...\"]) at 4"),
        ("$.a b", "bad JSON path '$.a b': unexpected ' ' (expected '.' or '[') at 3"),
        ("$['a", 'bad JSON path "$[\'a": unterminated string at 2'),
        ("$[" + "9" * 30 + "]", f"bad JSON path '$[{'9' * 30}]': index too large at 2"),
    ],
)
def test_error_messages_read_well(text: str, message: str) -> None:
    """A bad path in the config is reported with the path, the problem and its position."""
    with pytest.raises(JsonPathError) as caught:
        compile_path(text)
    assert str(caught.value) == message


_DOC: dict[str, Any] = {
    "predictions": [0.1, 0.9, 0.5],
    "instances": [
        {"amount": 10, "email": "a@x", "country": "DE"},
        {"amount": 20, "email": "b@x"},
        {"amount": "n/a", "email": None, "country": "FR"},
    ],
    "meta": {"model": "v2", "odd key": {"it's": 1}, "prédiction": 7},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$", [_DOC]),
        ("$.predictions[*]", [0.1, 0.9, 0.5]),
        ("$.predictions[0]", [0.1]),
        ("$.predictions[-1]", [0.5]),
        ("$.predictions[3]", []),
        ("$.predictions[-4]", []),
        ("$.instances[*].amount", [10, 20, "n/a"]),
        ("$.instances[*].country", ["DE", "FR"]),
        ("$['meta']['odd key'][\"it's\"]", [1]),
        ("$.meta[\"odd key\"]['it\\'s']", [1]),
        ("$.meta.prédiction", [7]),
        ("$.meta.*", ["v2", {"it's": 1}, 7]),
        ("$.meta[0]", []),
        ("$.meta.model[0]", []),
        ("$.predictions.x", []),
        ("$.predictions[0].x[*]", []),
        ("$.nothing[*].deeper", []),
    ],
)
def test_find_on_a_model_payload(text: str, expected: list[Any]) -> None:
    """Feature and comparison paths pick the documented values, and wrong shapes just find nothing."""
    assert compile_path(text).find(_DOC) == expected


def test_index_on_dict_with_digit_keys_finds_nothing() -> None:
    """`[0]` means a list element, so a dict with a "0" key is not indexed by it."""
    assert compile_path("$[0]").find({"0": 1}) == []
    assert compile_path('$["0"]').find({"0": 1}) == [1]
    assert compile_path("$.0").find({"0": 1}) == [1]
    assert compile_path('$["0"]').find([1]) == []


def test_bools_are_not_indexes_and_scalars_are_leaves() -> None:
    """Strings, numbers, tuples and None are leaves: no step goes inside them."""
    for leaf in ["abc", 12, 1.5, True, None, ("a", "b")]:
        for text in ("$[0]", "$[*]", "$.a", "$[-1]"):
            assert compile_path(text).find(leaf) == []


def test_first_returns_default_when_nothing_matches() -> None:
    """`first` gives the first match in document order, or the default the caller chose."""
    assert compile_path("$.predictions[*]").first(_DOC) == 0.1
    assert compile_path("$.instances[*].country").first(_DOC) == "DE"
    assert compile_path("$.instances[*].zip").first(_DOC, default="none") == "none"
    assert compile_path("$.predictions[7]").first(_DOC) is None


def test_redact_copies_only_the_touched_branches() -> None:
    """The redacted sample shares untouched parts with the original and leaves the original as it was."""
    before = copy.deepcopy(_DOC)
    out = compile_path("$.instances[*].email").redact(_DOC)
    assert before == _DOC
    assert [i["email"] for i in out["instances"]] == ["[redacted]"] * 3
    assert out["predictions"] is _DOC["predictions"]
    assert out["meta"] is _DOC["meta"]
    assert out["instances"] is not _DOC["instances"]
    assert compile_path("$").redact(_DOC, replacement=None) is None
    assert compile_path("$.absent").redact(_DOC) is _DOC


def test_redact_all_with_nested_and_overlapping_paths() -> None:
    """Several redact paths apply together; a path inside an already-redacted value finds nothing."""
    paths = [compile_path(t) for t in ("$.meta", "$.meta.model", "$.instances[1].email", "$.instances[-1]")]
    out = redact_all(_DOC, paths, replacement="***")
    assert out["meta"] == "***"
    assert out["instances"][1]["email"] == "***"
    assert out["instances"][2] == "***"
    assert out["instances"][0] is _DOC["instances"][0]
    assert redact_all(_DOC, []) is _DOC


def test_compile_is_cached_and_paths_compare_by_text() -> None:
    """The same path text compiles once; paths print, compare and hash by the text as written."""
    a = compile_path("$.predictions[*]")
    assert compile_path("$.predictions[*]") is a
    assert a == JsonPath("$.predictions[*]")
    assert hash(a) == hash(JsonPath("$.predictions[*]"))
    assert a != compile_path('$["predictions"][*]')
    assert a.canonical == compile_path('$["predictions"].*').canonical == "$.predictions[*]"
    assert repr(a) == "JsonPath('$.predictions[*]')"
    assert str(a) == a.text == "$.predictions[*]"
    assert a.is_multi
    assert not compile_path("$.predictions[0]").is_multi
    assert a != "$.predictions[*]"


def test_canonical_escapes_what_needs_escaping() -> None:
    """Keys with quotes, spaces or control characters print in a bracket form that reads back the same."""
    text = '$["a\\"b"][\'c d\']["\\n"]["\\ud83d\\ude00"]["*"]'
    path = compile_path(text)
    assert path.canonical == '$["a\\"b"]["c d"]["\\n"]["😀"]["*"]'
    doc = {'a"b': {"c d": {"\n": {"😀": {"*": 42}}}}}
    assert path.find(doc) == [42]
    assert compile_path(path.canonical).find(doc) == [42]
