"""Protobuf messages to proto3 JSON objects and back, as ``json_format`` prints and parses them, for the
agent's own message types.

Why not ``json_format`` alone: it walks the descriptors in pure Python with many checks per field on
every call, ~40-100 µs for a watch event or a process's start or end event on this 2-core VM. The
SDKs speak Connect JSON, so that is paid on every streamed message they receive, on the path the
watch write→event and ``run("true")`` latencies measure. Here each field gets its converter once
(cached per field descriptor), and a message is its ``ListFields()`` (the fields that are set, which
is what ``MessageToDict`` prints, with the same JSON names) through those converters.

Covered: integers (64-bit ones as strings), booleans, strings, bytes (standard base64), enums (by
name; an unknown number as the number), nested and repeated messages, maps with string keys, and the
well-known types: ``Timestamp`` by its own ``ToJsonString`` (what ``json_format`` calls), the others
handed to ``json_format`` value by value. A message type with anything else (floats, whose JSON form
has special cases, or maps with other keys) goes through ``json_format`` whole. Tests compare both on
every message type the agent sends.

Parsing (:func:`parse`, Connect's JSON requests: every call the SDKs make) is ``json_format.Parse(...,
ignore_unknown_fields=True)`` for the same kinds of fields, written here for memory rather than time:
``json_format`` imports protobuf's pure-Python encoder, decoder, containers and ``pickle``, and its map
handling reads a field's options, which loads ``descriptor_pb2`` (all of ``descriptor.proto``): 1.5 MiB
of RSS that the standalone agent kept after the first SDK call, ~6 % of it (see docs/benchmarks.md,
"protobuf's JSON half"). Request types with other fields still go through ``json_format``. Tests parse
the same inputs, valid and not, with both.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

Converter = Callable[[Any], Any]

_SIMPLE: dict[Any, bool] = {}
"""Message descriptor → whether :func:`message_to_dict` converts it itself (descriptors are typed
``Any``: the pure-Python and upb classes differ)."""

_CONVERTERS: dict[Any, Converter] = {}

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOATS = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


def message_to_dict(message: Message) -> Any:
    """``json_format.MessageToDict(message)``, the same object."""
    descriptor: Any = message.DESCRIPTOR
    simple = _SIMPLE.get(descriptor)
    if simple is None:
        simple = _SIMPLE[descriptor] = _is_simple(descriptor, set())
    if not simple:
        return _json_format().MessageToDict(message)
    return _to_dict(message)


def _json_format() -> Any:
    """protobuf's ``json_format``, imported when a message needs it (see the module's docstring)."""
    from google.protobuf import json_format

    return json_format


def _to_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        convert = _CONVERTERS.get(field)
        if convert is None:
            convert = _CONVERTERS[field] = _converter(field)
        out[field.json_name] = convert(value)
    return out


def _is_well_known(descriptor: Any) -> bool:
    return str(descriptor.full_name).startswith("google.protobuf.")


def _is_map(field: Any) -> bool:
    """Whether ``field`` is a map: a repeated field of the ``<Name>Entry`` type that protoc nests in the
    field's own message for it (a message cannot declare a type of that name itself: protoc refuses
    it). Not ``GetOptions().map_entry``, which makes upb load ``descriptor_pb2`` (0.5 MiB)."""
    entry = field.message_type
    return (
        entry is not None
        and field.is_repeated
        and entry.containing_type == field.containing_type
        and entry.name == "".join(part[:1].upper() + part[1:] for part in field.name.split("_")) + "Entry"
    )


def _is_simple(descriptor: Any, seen: set[Any]) -> bool:
    if descriptor in seen or _is_well_known(descriptor):
        return True
    seen.add(descriptor)
    for field in descriptor.fields:
        if field.type in _FLOATS:
            return False
        if _is_map(field):
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if key.type != FieldDescriptor.TYPE_STRING or value.type in _FLOATS or value.message_type is not None:
                return False
        elif field.message_type is not None and not _is_simple(field.message_type, seen):
            return False
    return True


def _scalar(field: Any) -> Converter | None:
    """How one value of a non-message field converts; None when it stays as it is."""
    if field.type in _INT64:
        return str
    if field.type == FieldDescriptor.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode()
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = {number: value.name for number, value in field.enum_type.values_by_number.items()}
        return lambda value: names.get(value, value)
    return None


def _converter(field: Any) -> Converter:
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        convert_value = _scalar(value_field)
        if convert_value is None:
            return dict
        return lambda mapping: {key: convert_value(value) for key, value in mapping.items()}
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            one: Converter = _timestamp
        elif _is_well_known(field.message_type):
            one = lambda value: _json_format().MessageToDict(value)  # noqa: E731
        else:
            one = _to_dict
    else:
        one = _scalar(field) or (lambda value: value)
    if field.is_repeated:
        return lambda values: [one(value) for value in values]
    return one


def _timestamp(value: Any) -> str:
    """A ``Timestamp``'s RFC 3339 text, as ``json_format`` prints it (through the same method)."""
    text: str = value.ToJsonString()
    return text


class ParseError(ValueError):
    """A JSON request that does not fit its message type (``json_format.ParseError``'s counterpart)."""


M = TypeVar("M", bound=Message)

MAX_DEPTH = 100
"""Nested messages allowed, as ``json_format``'s ``max_recursion_depth`` (the agent's own types nest
four deep; JSON nested deeper than Python's parser allows fails in ``json.loads`` already)."""

_INTEGERS = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")

_PARSEABLE: dict[Any, bool] = {}
"""Message descriptor → whether :func:`parse` converts it itself."""

_FIELDS: dict[Any, dict[str, Any]] = {}
"""Message descriptor → its fields by JSON name and by proto name (JSON names first, as
``json_format`` looks them up)."""


class _UnknownEnumName(ParseError):
    """An enum value given by a name the type does not have: skipped, as unknown fields are."""


def parse(data: bytes, message_type: type[M]) -> M:
    """``json_format.Parse(data or b"{}", message_type(), ignore_unknown_fields=True)``: the same message,
    or :class:`ParseError` (or ``UnicodeDecodeError``) where it raises. One difference: JSON that is
    not an object where a message goes (``[]``, ``"x"``) is refused, as Go's ``protojson`` (envd's)
    refuses it; ``json_format`` iterates over it and ignores what it finds."""
    message = message_type()
    descriptor: Any = message.DESCRIPTOR
    parseable = _PARSEABLE.get(descriptor)
    if parseable is None:
        parseable = _PARSEABLE[descriptor] = _is_parseable(descriptor, set())
    if not parseable:
        json_format = _json_format()
        try:
            json_format.Parse(data or b"{}", message, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise ParseError(str(exc)) from None
        return message
    try:
        text = data.decode() if data else "{}"
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        js = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"Failed to load JSON: {exc}.") from None
    try:
        _merge(js, message, 1)
    except ParseError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a JSON value of the wrong type
        raise ParseError(f"Failed to parse JSON: {type(exc).__name__}: {exc}.") from None
    return message


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a name twice leaves fewer entries than pairs
    if len(out) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ParseError(f"duplicate key {name}")
            seen.add(name)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)
"""One decoder for every :func:`parse` (``json.loads`` with a hook makes a decoder, and its scanner,
per call)."""


def _is_parseable(descriptor: Any, seen: set[Any]) -> bool:
    """Whether every field of ``descriptor`` (and of the messages it holds) is one :func:`parse`
    converts: integers, booleans, strings, bytes, enums, messages that are not well-known types, and
    maps of those scalars."""
    if _is_well_known(descriptor):
        return False
    if descriptor in seen:
        return True
    seen.add(descriptor)
    for field in descriptor.fields:
        if _is_map(field):
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if not (_is_parseable_scalar(key) and _is_parseable_scalar(value)):
                return False
        elif field.message_type is not None:
            if not _is_parseable(field.message_type, seen):
                return False
        elif not _is_parseable_scalar(field):
            return False
    return True


def _is_parseable_scalar(field: Any) -> bool:
    return field.message_type is None and field.type not in _FLOATS and not field.is_extension


def _fields(descriptor: Any) -> dict[str, Any]:
    found = _FIELDS.get(descriptor)
    if found is None:
        found = {field.name: field for field in descriptor.fields}
        found.update({field.json_name: field for field in descriptor.fields})
        _FIELDS[descriptor] = found
    return found


def _merge(js: Any, message: Any, depth: int) -> None:
    """Set ``message``'s fields from the JSON object ``js``, as ``json_format``'s ``_ConvertFieldValuePair``."""
    if depth > MAX_DEPTH:
        raise ParseError(f"Message too deep. Max recursion depth is {MAX_DEPTH}")
    descriptor = message.DESCRIPTOR
    if not isinstance(js, dict):
        raise ParseError(f"{descriptor.full_name}: a JSON object is needed, not {type(js).__name__}")
    fields = _fields(descriptor)
    seen: set[str] = set()
    for name, value in js.items():
        field = fields.get(name)
        if field is None:
            continue  # unknown fields are ignored, as Connect's clients expect of a server
        oneof = field.containing_oneof
        if name in seen:
            raise ParseError(f'Message type "{descriptor.full_name}" should not have multiple "{name}" fields.')
        seen.add(name)
        if oneof is not None and value is not None:
            if oneof.name in seen:
                raise ParseError(
                    f'Message type "{descriptor.full_name}" should not have multiple "{oneof.name}" oneof fields.'
                )
            seen.add(oneof.name)
        try:
            _set(message, field, value, depth)
        except _UnknownEnumName:
            pass
        except ParseError as exc:
            raise ParseError(f"Failed to parse {name} field: {exc}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ParseError(f"Failed to parse {name} field: {exc}.") from None


_MAPS: dict[Any, bool] = {}
"""Field descriptor → :func:`_is_map` (which builds the entry type's name from the field's each time)."""


def _set(message: Any, field: Any, value: Any, depth: int) -> None:
    is_map = _MAPS.get(field)
    if is_map is None:
        is_map = _MAPS[field] = _is_map(field)
    if value is None:
        message.ClearField(field.name)
    elif is_map:
        message.ClearField(field.name)
        if not isinstance(value, dict):
            raise ParseError(f"Map field {field.name} must be in a dict which is {value}")
        target = getattr(message, field.name)
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            converted_key = _scalar_value(key, key_field, map_key=True)
            with contextlib.suppress(_UnknownEnumName):
                target[converted_key] = _scalar_value(item, value_field)
    elif field.is_repeated:
        message.ClearField(field.name)
        if not isinstance(value, list):
            raise ParseError(f"repeated field {field.name} must be in [] which is {value}")
        target = getattr(message, field.name)
        for item in value:
            if item is None:
                raise ParseError(f"null is not allowed to be used as an element in a repeated field {field.name}")
            if field.message_type is not None:
                _merge(item, target.add(), depth + 1)
            else:
                with contextlib.suppress(_UnknownEnumName):
                    target.append(_scalar_value(item, field))
    elif field.message_type is not None:
        child = getattr(message, field.name)
        child.SetInParent()
        _merge(value, child, depth + 1)
    else:
        setattr(message, field.name, _scalar_value(value, field))


def _scalar_value(value: Any, field: Any, map_key: bool = False) -> Any:
    """One scalar's JSON value converted, as ``json_format``'s ``_ConvertScalarFieldValue``."""
    cpp_type = field.cpp_type
    if cpp_type in _INTEGERS:
        return _integer(value)
    if cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        if map_key:
            if value in ("true", "false"):
                return value == "true"
            raise ParseError(f'Expected "true" or "false", not {value}')
        if not isinstance(value, bool):
            raise ParseError("Expected true or false without quotes")
        return value
    if field.type == FieldDescriptor.TYPE_BYTES:
        encoded = value.encode() if isinstance(value, str) else value
        return base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))  # either alphabet, any padding
    if cpp_type == FieldDescriptor.CPPTYPE_STRING:
        if not value.isascii() and _UNPAIRED_SURROGATE.search(value):  # (ASCII has no surrogates)
            raise ParseError("Unpaired surrogate")
        return value
    if cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        enum_value = field.enum_type.values_by_name.get(value)
        if enum_value is not None:
            return enum_value.number
        try:
            number = int(value)
        except ValueError:
            raise _UnknownEnumName(f"Invalid enum value {value} for enum type {field.enum_type.full_name}") from None
        if number not in field.enum_type.values_by_number and field.enum_type.is_closed:
            raise ParseError(f"Invalid enum value {value} for enum type {field.enum_type.full_name}")
        return number
    raise ParseError(f"{field.full_name}: a field type this parser does not convert")  # excluded by _is_parseable


def _integer(value: Any) -> int:
    """An integer field's JSON value (a number, or a string holding one), as ``json_format``'s
    ``_ConvertInteger``."""
    if isinstance(value, bool):
        raise ParseError(f"Bool value {value} is not acceptable for integer field")
    if isinstance(value, float) and not value.is_integer():
        raise ParseError(f"Couldn't parse integer: {value}")
    if isinstance(value, str) and " " in value:
        raise ParseError(f'Couldn\'t parse integer: "{value}"')
    try:
        return int(value)
    except ValueError:
        as_float = float(value)  # a ValueError of its own when it is no number at all
        if not as_float.is_integer():
            raise ParseError(f'Couldn\'t parse non-integer string: "{value}"') from None
        return int(as_float)
