"""The generated sections of docs/: config keys, metrics, admin API and CLI, from the code.

A page under docs/ holds each generated section between two marker comments:

    <!-- generated: metrics -->
    ...                                   written by this module, never by hand
    <!-- end generated -->

The name (and an optional argument, `<!-- generated: config routes[].retry -->`) says what
goes there:

    config SECTION   a table of the section's keys from the pydantic models
                     (sidecar/config/model.py): key, type, default, the field's description
    metrics          every family declared in sidecar/shell/metrics.py: name, type, labels, help
    admin-api        every operation of the OpenAPI document (sidecar/shell/openapi.py)
    admin-schemas    the document's answer shapes, field by field
    cli              every `sidecar` subcommand and option (sidecar/cli.py's parser)

`python -m sidecar.docgen` rewrites every page that holds such sections; `--check` writes
nothing and exits 1 naming each page that differs. tests/test_docs.py runs the check, so a
field, metric, endpoint or option added without its description fails the suite.

The rendering is deterministic: nothing here reads the environment, the clock or the
terminal width (argparse's defaults come from the environment, so they are not shown;
help texts say them).

Imports: everything it documents (cli, config, shell); nothing imports it but tests.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.cli import build_parser
from sidecar.config import model as cm
from sidecar.shell.metrics import (
    CallbackCounter,
    CallbackGauge,
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    Metrics,
)
from sidecar.shell.openapi import openapi_document

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMMAND = "python -m sidecar.docgen"
MARKER = re.compile(r"<!-- generated: (?P<name>[\w-]+)(?: (?P<arg>\S+))? -->\n(?P<body>.*?)<!-- end generated -->",
                    re.DOTALL)


class DocgenError(Exception):
    """Something in the code cannot be documented (a field without description, an unknown section)."""


def _cell(text: str) -> str:
    """Text that is safe inside a Markdown table cell: `|` escaped, and outside code spans a
    `<` that would open an HTML tag (`<token>`) written as `&lt;`."""
    parts = re.split(r"(`[^`]*`)", text.replace("|", "\\|").replace("\n", " "))
    return "".join(p if p.startswith("`") else re.sub(r"<(?=[A-Za-z/])", "&lt;", p) for p in parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def slug(heading: str) -> str:
    """The anchor a code host (GitHub) gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# -- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    """One config model and the place it has in a file, e.g. `routes[].retry`."""

    place: str
    model: type[BaseModel]

    @property
    def heading(self) -> str:
        return "top level" if not self.place else f"`{self.place}`"

    @property
    def name(self) -> str:
        return self.place or "top-level"


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Strip `Annotated` and `X | None`: the inner type and the metadata found on the way."""
    meta: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *more = get_args(annotation)
            meta += more
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, meta
            annotation = args[0]
        else:
            return annotation, meta


def _submodel(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds and how its place reads: `` (one), `[]` (a list), `.<name>` (a map)."""
    inner, _ = _unwrap(annotation)
    origin = get_origin(inner)
    if origin is list:
        item, _ = _unwrap(get_args(inner)[0])
        return (item, "[]") if isinstance(item, type) and issubclass(item, BaseModel) else None
    if origin is dict:
        value, _ = _unwrap(get_args(inner)[1])
        return (value, ".<name>") if isinstance(value, type) and issubclass(value, BaseModel) else None
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner, ""
    return None


def config_sections() -> list[Section]:
    """Every section of the config file, parents before children, in the models' field order."""
    out: list[Section] = []

    def walk(place: str, model: type[BaseModel]) -> None:
        out.append(Section(place, model))
        for name, field in model.model_fields.items():
            sub = _submodel(field.annotation)
            if sub is not None:
                key = field.alias or name
                walk(f"{place}.{key}{sub[1]}" if place else f"{key}{sub[1]}", sub[0])

    walk("", cm.Config)
    return out


_VALIDATOR_TYPES: dict[Callable[..., Any], str] = {
    cm.parse_duration: "duration",
    cm.parse_size: "size",
    cm._check_listen: "HOST:PORT",
    cm._check_url: "URL",
    cm._check_header_name: "header name",
    cm._check_json_path: "JSON path",
    cm._check_path: "URL path",
}


def _num(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _range(meta: Sequence[Any]) -> str:
    """`0 to 1`, `>= 1`, `> 0`: the numeric bounds a field's metadata sets."""
    lo = hi = None
    for m in meta:
        if isinstance(m, FieldInfo):
            inner = _range(m.metadata)
            if inner:
                return inner
        if isinstance(m, Ge):
            lo = _num(m.ge)
        elif isinstance(m, Gt):
            lo = f"> {_num(m.gt)}"
        elif isinstance(m, Le):
            hi = _num(m.le)
        elif isinstance(m, Lt):
            hi = f"< {_num(m.lt)}"
    if lo is not None and hi is not None and not lo.startswith(">") and not hi.startswith("<"):
        return f"{lo} to {hi}"
    parts = [(lo if lo.startswith(">") else f">= {lo}") if lo is not None else "",
             (hi if hi.startswith("<") else f"<= {hi}") if hi is not None else ""]
    return ", ".join(p for p in parts if p)


def _nullable(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _type_text(annotation: Any, meta: Sequence[Any] = ()) -> str:
    inner, more = _unwrap(annotation)
    meta = [*meta, *more]
    for m in meta:
        func = getattr(m, "func", None)
        if func in _VALIDATOR_TYPES:
            bounds = _range(meta)
            named = _VALIDATOR_TYPES[func]
            return f"{named} ({bounds})" if bounds and named in ("duration", "size") else named
    origin = get_origin(inner)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in get_args(inner))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in get_args(inner) if a is not type(None))
    if origin is list:
        return f"list of {_type_text(get_args(inner)[0])}"
    if origin is dict:
        key, value = get_args(inner)
        return f"map: {_type_text(key)} -> {_type_text(value)}"
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return "section"
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    text = simple.get(inner, "any") if isinstance(inner, type) else "any"
    bounds = _range(meta)
    return f"{text} ({bounds})" if bounds and text in ("integer", "number") else text


def _duration_text(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default_text(field: FieldInfo, type_text: str) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(its defaults)"
    else:
        value = field.default
    if value is None:
        return "none"
    if type_text.startswith("duration"):
        return f"`{_duration_text(value)}`"
    if type_text.startswith("size"):
        return f"`{_size_text(value)}`"
    if value in ("", [], {}):
        return '`""`' if value == "" else f"`{_yaml_text(value)}`"
    return f"`{_yaml_text(value)}`"


def config_table(place: str, sections: Sequence[Section] | None = None) -> str:
    """The table of one config section: key, type, default, meaning."""
    sections = config_sections() if sections is None else sections
    by_place = {s.place if s.place else "top-level": s for s in sections}
    section = by_place.get(place)
    if section is None:
        raise DocgenError(f"no config section {place!r} (known: {', '.join(by_place)})")
    rows = []
    for name, field in section.model.model_fields.items():
        key = field.alias or name
        if not field.description:
            raise DocgenError(f"{section.model.__name__}.{name} has no description: add Field(description=...) "
                              "in sidecar/config/model.py")
        sub = _submodel(field.annotation)
        type_text = _type_text(field.annotation, field.metadata)
        default = _default_text(field, type_text)
        if _nullable(field.annotation) and default not in ("none", "required"):
            type_text += " or `null`"
        meaning = field.description
        if sub is not None:
            child = f"{section.place}.{key}{sub[1]}" if section.place else f"{key}{sub[1]}"
            type_text = {"": "section", "[]": "list of sections", ".<name>": "map: name -> section"}[sub[1]]
            meaning += f" ([`{child}`](#{slug(f'`{child}`')}))"
        rows.append([f"`{key}`", type_text, default, meaning])
    return f"### {section.heading}\n\n" + _table(["key", "type", "default", "meaning"], rows)


# -- metrics ------------------------------------------------------------------------------------------


def _metric_kind(family: object) -> str:
    if isinstance(family, HistogramFamily):
        return "histogram"
    if isinstance(family, CounterFamily | CallbackCounter):
        return "counter"
    if isinstance(family, GaugeFamily | CallbackGauge):
        return "gauge"
    raise DocgenError(f"unknown metric family type {type(family).__name__}")


def metrics_table() -> str:
    rows = [[f"`{f.name}`", _metric_kind(f), ", ".join(f.labelnames), f.doc] for f in Metrics().families]
    return _table(["metric", "type", "labels", "meaning"], rows)


# -- admin API -------------------------------------------------------------------------------------------

_REF = "#/components/schemas/"


def _auth_text(op: dict[str, Any], method: str) -> str:
    if op.get("security") == []:
        return "none"
    return "token; 403 rule" if method not in ("get", "head") else "token"


def admin_api_table() -> str:
    doc = openapi_document()
    rows = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            answers = ", ".join(f"{code} {resp['description']}" for code, resp in op["responses"].items()
                                if code not in ("401", "403"))
            rows.append([f"`{method.upper()} {path}`", op["summary"], answers, _auth_text(op, method)])
    return _table(["endpoint", "what", "answers", "auth"], rows)


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(_REF)
        return f"[{name}](#{slug(_schema_heading(name))})"
    if "anyOf" in schema:
        return " or ".join(_schema_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"list of {_schema_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map: name -> {_schema_type(schema['additionalProperties'])}"
    return kind or "any"


def _schema_heading(name: str) -> str:
    """Headings of named schemas say so: a page may have a prose section called `Weights` too."""
    return f"{name} (schema)"


def _fields(schema: dict[str, Any], prefix: str) -> Iterator[list[str]]:
    """Rows for an inline schema's fields, nested objects and lists of objects flattened by path."""
    for name, sub in schema.get("properties", {}).items():
        place = f"{prefix}{name}"
        yield [f"`{place}`", _schema_type(sub), sub.get("description", "")]
        if sub.get("type") == "object" and "properties" in sub:
            yield from _fields(sub, place + ".")
        items = sub.get("items", {})
        if sub.get("type") == "array" and "properties" in items:
            yield from _fields(items, place + "[].")


def admin_schemas() -> str:
    """Each answer shape: the named schemas, then the inline answers of the operations."""
    doc = openapi_document()
    parts = []
    for name, schema in doc["components"]["schemas"].items():
        rows = list(_fields(schema, ""))
        intro = schema.get("description", "")
        if not rows:
            intro = f"{intro} (`{_schema_type(schema)}`)"
        parts.append(f"### {_schema_heading(name)}\n\n" + (f"{intro}\n\n" if intro else "")
                     + (_table(["field", "type", "meaning"], rows) if rows else ""))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            schema = op["responses"].get("200", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema is None or "$ref" in schema or not schema.get("properties"):
                continue
            rows = list(_fields(schema, ""))
            parts.append(f"### {method.upper()} {path}\n\n" + _table(["field", "type", "meaning"], rows))
    return "\n".join(parts)


# -- CLI ---------------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _usage_part(action: argparse.Action) -> str:
    if not action.option_strings:
        name = str(action.metavar or action.dest)
        return f"[{name} ...]" if action.nargs == "*" else name
    text = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
    if action.nargs != 0:
        text += " " + ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                       else str(action.metavar or action.dest.upper()))
    return text if action.required else f"[{text}]"


def cli_reference() -> str:
    parser = build_parser()
    rows = []
    options: dict[tuple[str, str], list[str]] = {}  # (option, help) -> commands, so shared options show once
    for name, what, sub in _subcommands(parser):
        actions = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        usage = " ".join(["sidecar", name, *(_usage_part(a) for a in actions)])
        rows.append([f"`{usage}`", what])
        for a in actions:
            if not a.help:
                raise DocgenError(f"`sidecar {name}` {a.option_strings or a.dest} has no help text (sidecar/cli.py)")
            option = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
            options.setdefault((option, a.help), []).append(name)
    option_rows = [[", ".join(f"`{c}`" for c in commands), option, help_text]
                   for (option, help_text), commands in options.items()]
    return _table(["command", "what"], rows) + "\n" + _table(["commands", "option", "meaning"], option_rows)


# -- pages -------------------------------------------------------------------------------------------------


def render(name: str, arg: str | None) -> str:
    if name == "config":
        if arg is None:
            raise DocgenError("`config` needs a section, e.g. <!-- generated: config routes[].retry -->")
        return config_table(arg)
    simple: dict[str, Callable[[], str]] = {"metrics": metrics_table, "admin-api": admin_api_table,
                                            "admin-schemas": admin_schemas, "cli": cli_reference}
    if name not in simple or arg is not None:
        raise DocgenError(f"unknown generated section {name!r} {arg or ''}")
    return simple[name]()


def regenerate(text: str) -> str:
    """The page with every generated section written anew."""
    def replace(m: re.Match[str]) -> str:
        head = f"<!-- generated: {m['name']}" + (f" {m['arg']}" if m["arg"] else "") + " -->\n"
        return head + render(m["name"], m["arg"]) + "<!-- end generated -->"

    return MARKER.sub(replace, text)


def sections_in(text: str) -> list[tuple[str, str | None]]:
    return [(m["name"], m["arg"]) for m in MARKER.finditer(text)]


def pages(docs: Path = DOCS) -> list[Path]:
    return sorted(p for p in docs.rglob("*.md") if "<!-- generated:" in p.read_text())


def stale(docs: Path = DOCS) -> list[Path]:
    """Pages whose generated sections differ from what the code gives now."""
    return [p for p in pages(docs) if regenerate(p.read_text()) != p.read_text()]


def undocumented_sections(docs: Path = DOCS) -> list[str]:
    """Config sections that no page holds a generated table for."""
    found = {arg for page in pages(docs) for name, arg in sections_in(page.read_text()) if name == "config"}
    return [s.name for s in config_sections() if s.name not in found]


def _shown(page: Path, docs: Path) -> str:
    """docs/reference/metrics.md rather than an absolute path."""
    return str(page.relative_to(docs.parent)) if page.is_relative_to(docs.parent) else str(page)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description="Rewrite the generated sections of docs/.")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is out of date")
    p.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: the repository's)")
    args = p.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale(args.docs)
            for page in out_of_date:
                print(f"{_shown(page, args.docs)}: generated sections are out of date; run `{COMMAND}`",
                      file=sys.stderr)
            missing = undocumented_sections(args.docs)
            for name in missing:
                print(f"config section {name!r} has no table: add <!-- generated: config {name} --> to "
                      "docs/reference/configuration.md", file=sys.stderr)
            return 1 if out_of_date or missing else 0
        for page in pages(args.docs):
            text = page.read_text()
            new = regenerate(text)
            if new != text:
                page.write_text(new)
                print(f"updated {_shown(page, args.docs)}")
    except DocgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
