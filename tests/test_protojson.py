"""``protojson.message_to_dict`` prints exactly what ``json_format.MessageToDict`` prints, for every
message type the agent's services answer with, filled in every way a field can be."""

from __future__ import annotations

import contextlib

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from sandboxd._proto.filesystem import filesystem_pb2 as fs
from sandboxd._proto.process import process_pb2 as proc
from sandboxd.agent.protojson import message_to_dict

ENTRY = fs.EntryInfo(
    name="a.txt",
    type=fs.FILE_TYPE_FILE,
    path="/home/user/a.txt",
    size=1 << 40,
    mode=0o644,
    permissions="-rw-r--r--",
    owner="user",
    group="user",
    symlink_target="",
    metadata={"k": "v", "ü": "ß"},
)
ENTRY.modified_time.FromSeconds(1_700_000_000)

SAMPLES: list[Message] = [
    proc.StartResponse(event=proc.ProcessEvent(start=proc.ProcessEvent.StartEvent(pid=4242))),
    proc.StartResponse(event=proc.ProcessEvent(start=proc.ProcessEvent.StartEvent(pid=0))),
    proc.StartResponse(event=proc.ProcessEvent(data=proc.ProcessEvent.DataEvent(stdout=b"\x00\xffhi\n"))),
    proc.ConnectResponse(event=proc.ProcessEvent(data=proc.ProcessEvent.DataEvent(pty=b""))),
    proc.StartResponse(
        event=proc.ProcessEvent(end=proc.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="signal: killed"))
    ),
    proc.StartResponse(
        event=proc.ProcessEvent(
            end=proc.ProcessEvent.EndEvent(exit_code=0, exited=True, status="exit status 0", error='boom "x"\n')
        )
    ),
    proc.StartResponse(event=proc.ProcessEvent(keepalive=proc.ProcessEvent.KeepAlive())),
    proc.ListResponse(
        processes=[
            proc.ProcessInfo(
                config=proc.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "true"], envs={"A": "1"}, cwd="/"),
                pid=7,
                tag="t",
            ),
            proc.ProcessInfo(config=proc.ProcessConfig(cmd="sleep"), pid=8),
        ]
    ),
    proc.ListResponse(),
    fs.WatchDirResponse(start=fs.WatchDirResponse.StartEvent()),
    fs.WatchDirResponse(keepalive=fs.WatchDirResponse.KeepAlive()),
    fs.WatchDirResponse(filesystem=fs.FilesystemEvent(name="sub/new file ✓", type=fs.EVENT_TYPE_CREATE)),
    fs.WatchDirResponse(filesystem=fs.FilesystemEvent(name="x", type=fs.EVENT_TYPE_WRITE, entry=ENTRY)),
    fs.GetWatcherEventsResponse(
        events=[fs.FilesystemEvent(name="a", type=fs.EVENT_TYPE_REMOVE), fs.FilesystemEvent(name="b", type=99)]  # type: ignore[arg-type]
    ),
    fs.CreateWatcherResponse(watcher_id="wabc"),
    fs.StatResponse(entry=ENTRY),
    fs.ListDirResponse(entries=[ENTRY, fs.EntryInfo(name="d", type=fs.FILE_TYPE_DIRECTORY)]),
    fs.RemoveResponse(),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{type(m).__name__}:{m.ByteSize()}")
def test_same_object_as_json_format(message: Message) -> None:
    assert message_to_dict(message) == json_format.MessageToDict(message)
    assert message_to_dict(message) == json_format.MessageToDict(message)  # again, from the caches


# ---- parsing: protojson.parse against json_format.Parse(..., ignore_unknown_fields=True) ----

import json  # noqa: E402
from typing import Any  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from sandboxd.agent.protojson import ParseError, _is_parseable, parse  # noqa: E402


def _all_types() -> list[type[Message]]:
    from google.protobuf import message_factory

    out: list[type[Message]] = []
    for module in (fs, proc):
        stack = list(module.DESCRIPTOR.message_types_by_name.values())
        while stack:
            descriptor = stack.pop()
            stack.extend(descriptor.nested_types)
            if not descriptor.GetOptions().map_entry:
                out.append(message_factory.GetMessageClass(descriptor))
    return sorted(out, key=lambda t: t.DESCRIPTOR.full_name)


TYPES = _all_types()


def _outcome(how: Any, data: bytes, message_type: type[Message]) -> tuple[str, Any]:
    try:
        return "ok", how(data, message_type).SerializeToString(deterministic=True)
    except (json_format.ParseError, ParseError, ValueError, RecursionError, UnicodeDecodeError):
        return "error", None


def _json_format_parse(data: bytes, message_type: type[Message]) -> Message:
    message = json_format.Parse(data or b"{}", message_type(), ignore_unknown_fields=True)
    if _is_parseable(message_type.DESCRIPTOR, set()):  # else ``parse`` hands the JSON to json_format itself
        _refuse_enum_numbers_out_of_range(json.loads(data or b"{}"), message_type.DESCRIPTOR)
    return message


def _refuse_enum_numbers_out_of_range(js: Any, descriptor: Any) -> None:
    """The one place where ``parse`` means to differ from ``json_format``: an enum given as a number
    outside int32 (``{"signal": "4294967296"}``). ``json_format`` lets upb wrap it silently into range
    (that one becomes 0, ``SIGNAL_UNSPECIFIED``); ``parse`` refuses it, as Go's protojson (envd) does.
    Raises ValueError where ``json_format`` accepted such a value (it parsed ``js`` already)."""
    if not isinstance(js, dict):
        return
    for key, value in js.items():
        field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None or value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if field.cpp_type == field.CPPTYPE_ENUM:
            for item in items:
                number = None
                if isinstance(item, int | str) and not isinstance(item, bool):
                    with contextlib.suppress(ValueError):
                        number = int(item)
                if number is not None and not -(1 << 31) <= number < 1 << 31:
                    raise ValueError(f"enum number {item} out of int32's range")
        elif field.cpp_type == field.CPPTYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            for item in items:
                _refuse_enum_numbers_out_of_range(item, field.message_type)


def _same(data: bytes, message_type: type[Message]) -> None:
    ours, theirs = _outcome(parse, data, message_type), _outcome(_json_format_parse, data, message_type)
    assert ours == theirs, (message_type.DESCRIPTOR.full_name, data)


REQUESTS: list[tuple[type[Message], str]] = [
    (proc.StartRequest, ""),
    (proc.StartRequest, "{}"),
    (proc.StartRequest, '{"process":{"cmd":"/bin/bash","args":["-l","-c","true"],"envs":{"A":"1","ü":"ß"},"cwd":"/"}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":80,"rows":"24"}},"tag":"t","stdin":false}'),
    (proc.StartRequest, '{"process":{"cmd":"x","envs":null,"args":null,"cwd":null},"unknown":[1,{"a":2}]}'),
    (proc.StartRequest, '{"process":{"cmd":"x","envs":{"A":1}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x","envs":{"A":null}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x","envs":[]}}'),
    (proc.StartRequest, '{"process":{"cmd":"x","args":"a"}}'),
    (proc.StartRequest, '{"process":{"cmd":"x","args":[null]}}'),
    (proc.StartRequest, '{"process":{"cmd":5}}'),
    (proc.StartRequest, '{"process":{"cmd":"\\ud800"}}'),
    (proc.StartRequest, '{"process":{"cmd":"\\ud83d\\ude00"}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"stdin":"true"}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"stdin":1}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"process":{"cmd":"y"}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":-1}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":4294967296}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":1.0,"rows":"2e1"}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":1.5}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":"1 "}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":true}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":1e400}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":"1e400"}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":NaN}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":"abc"}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":{"size":{"cols":[]}}}'),
    (proc.StartRequest, '{"process":{"cmd":"x"},"pty":null}'),
    (proc.StartRequest, '{"process":{"cmd":"x"'),
    (proc.StartRequest, '\ufeff{"process":{"cmd":"x"}}'),  # a BOM: refused, as json.loads refuses it
    (proc.StartRequest, '{"process":{"cmd":"x","envs":{"A":"1","A":"2"}}}'),  # a name twice in a map
    (proc.StartRequest, '{"process":{"cmd":"x","envs":{"A":"\\u00e9\\ud83d\\ude00"},"args":["\\u00e9"]}}'),
    (proc.StartRequest, '{"process":{"cmd":"x","envs":{"A":"\\u00e9\\udc00"}}}'),  # not ASCII, and unpaired
    (proc.StartRequest, '{"process":{"cmd":"x","args":["a","\\udbff"]}}'),
    (proc.StartRequest, b'{"process":{"cmd":"\xff"}}'.decode("latin-1")),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"aGk="}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"pty":"aGk"}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"-_-_"}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"+/+/"}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"a"}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"aGk=="}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":5}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"aGk=","pty":"aGk="}}'),
    (proc.SendInputRequest, '{"process":{"pid":3},"input":{"stdin":"aGk=","pty":null}}'),
    (proc.SendInputRequest, '{"process":{"pid":3,"tag":"t"}}'),
    (proc.SendInputRequest, '{"process":{"tag":"t","pid":null}}'),
    (proc.SendSignalRequest, '{"process":{"pid":"3"},"signal":"SIGNAL_SIGKILL"}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":15}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":12345}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":"SIGNAL_NOPE"}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":"15"}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":"4294967296"}'),  # refused (json_format: 0)
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":-2147483649}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":1.5}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":true}'),
    (proc.SendSignalRequest, '{"process":{"pid":3},"signal":[]}'),
    (proc.StreamInputRequest, '{"start":{"process":{"pid":1}}}'),
    (proc.StreamInputRequest, '{"data":{"input":{"stdin":"eA=="}}}'),
    (proc.StreamInputRequest, '{"keepalive":{}}'),
    (proc.UpdateRequest, '{"process":{"pid":1},"pty":{"size":{"cols":10,"rows":20}}}'),
    (fs.WatchDirRequest, '{"path":"/tmp","recursive":true}'),
    (fs.CreateWatcherRequest, '{"path":"/tmp","recursive":false}'),
    (fs.ListDirRequest, '{"path":"/tmp","depth":2}'),
    (fs.ListDirRequest, '{"path":"/tmp","depth":"-1"}'),
    (fs.MoveRequest, '{"source":"/a","destination":"/b"}'),
    (fs.StatRequest, '{"path":"/a","path":"/b"}'),
    (fs.GetWatcherEventsRequest, '{"watcherId":"w1"}'),
    (fs.GetWatcherEventsRequest, '{"watcher_id":"w1"}'),
    (fs.GetWatcherEventsRequest, '{"watcher_id":"w1","watcherId":"w2"}'),
    (fs.EntryInfo, '{"name":"a","modifiedTime":"2023-11-14T22:13:20Z","metadata":{"k":"v"}}'),
    (fs.EntryInfo, '{"name":"a","modifiedTime":"not a time"}'),
]


@pytest.mark.parametrize("message_type,text", REQUESTS, ids=lambda v: v.DESCRIPTOR.name if isinstance(v, type) else "")
def test_parse_is_json_format_parse(message_type: type[Message], text: str) -> None:
    """The same message, or an error where ``json_format`` errs, for valid and invalid requests."""
    _same(
        text.encode("utf-8", "surrogatepass")
        if "\ud800" in text
        else text.encode("latin-1", "ignore")
        if any(ord(c) > 0xFF for c in text) is False and "\xff" in text
        else text.encode(),
        message_type,
    )


@pytest.mark.parametrize("text", ["[]", '"x"', "5", "null", '{"process":[]}', '{"process":"abc"}'])
def test_parse_wants_objects_where_messages_go(text: str) -> None:
    """JSON that is not an object where a message goes is refused, as Go's protojson (envd's) refuses it."""
    with pytest.raises(ParseError):
        parse(text.encode(), proc.StartRequest)


def _fields_of(message_type: type[Message]) -> list[str]:
    names: list[str] = []
    for field in message_type.DESCRIPTOR.fields:
        names += [field.name, field.json_name]
    return names


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 65), max_value=1 << 65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["SIGNAL_SIGKILL", "FILE_TYPE_FILE", "1", "-1", "4294967296", "aGk=", "a-_b", "true", "1e3", ""]),
)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[type[Message], bytes]:
    message_type = draw(st.sampled_from(TYPES))

    def obj(depth: int) -> st.SearchStrategy[Any]:
        keys = st.sampled_from([*_fields_of(message_type), "pid", "cmd", "stdin", "size", "cols", "x"])
        children: st.SearchStrategy[Any] = _JSON_SCALARS if depth > 2 else st.one_of(_JSON_SCALARS, obj(depth + 1))
        return st.one_of(st.dictionaries(keys, children, max_size=4), st.lists(children, max_size=3))

    value = draw(
        st.dictionaries(st.sampled_from([*_fields_of(message_type), "x"]), st.one_of(_JSON_SCALARS, obj(1)), max_size=4)
    )
    return message_type, json.dumps(value).encode()


def _non_object_for_a_message(js: Any, descriptor: Any) -> bool:
    """Whether ``js`` holds JSON other than an object (or null) where a message goes: refused by
    :func:`parse`, iterated over by ``json_format`` (:func:`test_parse_wants_objects_where_messages_go`)."""
    if not isinstance(js, dict):
        return True
    by_name = {f.name: f for f in descriptor.fields} | {f.json_name: f for f in descriptor.fields}
    for key, value in js.items():
        field = by_name.get(key)
        if field is None or field.message_type is None or value is None:
            continue
        if field.message_type.GetOptions().map_entry or field.message_type.full_name.startswith("google.protobuf."):
            continue
        items = value if field.is_repeated and isinstance(value, list) else [] if field.is_repeated else [value]
        if any(item is not None and _non_object_for_a_message(item, field.message_type) for item in items):
            return True
    return False


@settings(max_examples=1500, deadline=None)
@given(_requests())
def test_parse_is_json_format_parse_on_generated_requests(case: tuple[type[Message], bytes]) -> None:
    """Generated JSON, the keys drawn from each type's field names: the same outcome as ``json_format``."""
    message_type, data = case
    handed_on = _is_parseable(message_type.DESCRIPTOR, set()) is False  # to json_format itself (a Timestamp)
    if not handed_on and _non_object_for_a_message(json.loads(data), message_type.DESCRIPTOR):
        with pytest.raises(ParseError):
            parse(data, message_type)
    else:
        _same(data, message_type)
