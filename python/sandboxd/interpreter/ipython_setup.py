"""The first cell every IPython kernel runs (sent silently by the server, so the template needs no
file of ours): the display formatters E2B's ``code-interpreter-v1`` kernels have.

* ``e2b/data``: a pandas DataFrame as ``{column: [values]}`` (``Result.data`` in the SDKs);
* ``e2b/chart``: a matplotlib Figure as chart data, extracted by E2B's own ``e2b-charts`` package
  when the template has it (``Result.chart``);
* ``application/json`` for plain lists and dicts (``Result.json``), numpy-aware with ``orjson``;
* tracebacks without ANSI colours, and sequences never truncated in ``text/plain``;
* stdout/stderr sent in messages of about 1 MiB at most: ipykernel otherwise sends everything
  printed within 0.2 s as one message (a 200 MB print loop became one 200 MB message, which the
  server has to hold several times over while it re-encodes it). Flushing blocks the writer until
  the message is out, which also lets a slow reader pace the kernel.

Each formatter looks for pandas or matplotlib in ``sys.modules`` instead of importing them, so a
kernel that never uses them never pays for their import.

Importing this module does nothing (the server reads its source); only running it as
``__main__`` (a cell) installs the formatters.
"""

from typing import Any


def _sandboxd_setup() -> None:
    import json
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    shell = get_ipython()
    formatter = shell.display_formatter

    class DataFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)

        def __call__(self, obj: Any) -> Any:
            pandas = sys.modules.get("pandas")
            if pandas is None or not isinstance(obj, pandas.DataFrame):
                return super().__call__(obj)
            columns = obj.to_dict(orient="list")
            return {
                str(name): [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in values]
                for name, values in columns.items()
            }

    class ChartFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict, str)

        def __call__(self, obj: Any) -> Any:
            figure_module = sys.modules.get("matplotlib.figure")
            if figure_module is None or not isinstance(obj, figure_module.Figure):
                return super().__call__(obj)
            try:
                from e2b_charts import chart_figure_to_dict
            except ImportError:  # the template has no e2b-charts: PNG only, no chart data
                return None
            try:
                return chart_figure_to_dict(obj)
            except Exception:  # a figure the extractor does not understand: PNG only
                return None

    class ListJSONFormatter(JSONFormatter):  # type: ignore[misc]
        def __call__(self, obj: Any) -> Any:
            if isinstance(obj, (list, dict)):
                try:
                    import orjson

                    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
                    return orjson.loads(orjson.dumps(obj, option=options)), {"expanded": True}
                except ImportError:
                    try:
                        return json.loads(json.dumps(obj)), {"expanded": True}
                    except (TypeError, ValueError):
                        pass
                except TypeError:
                    pass
            return super().__call__(obj)

    formatter.formatters["e2b/data"] = DataFormatter(parent=formatter)
    formatter.formatters["e2b/chart"] = ChartFormatter(parent=formatter)
    formatter.formatters["application/json"] = ListJSONFormatter(parent=formatter)
    formatter.formatters["text/plain"].max_seq_length = 0
    shell.colors = "nocolor"

    stream_message_max = 1 << 20  # characters
    stream_class: Any = type(sys.stdout)
    if hasattr(sys.stdout, "_buffers") and hasattr(stream_class, "_schedule_flush"):
        # ipykernel's OutStream.write buffers the text per parent message in a StringIO, then calls
        # _schedule_flush (outside its buffer lock). Patched there, on the class: IPython swaps the
        # instance's ``write`` around every cell.
        schedule_flush = stream_class._schedule_flush

        def schedule_bounded(self: Any) -> None:
            try:
                pending = sum(buffer.tell() for buffer in self._buffers.values())
            except Exception:  # another ipykernel version, or a concurrent write: skip this once
                pending = 0
            if pending >= stream_message_max:
                self.flush()
            else:
                schedule_flush(self)

        if not getattr(stream_class, "_sandboxd_bounded", False):
            stream_class._schedule_flush = schedule_bounded
            stream_class._sandboxd_bounded = True


if __name__ == "__main__":  # run as a cell: leave nothing behind in the user's namespace
    _sandboxd_setup()
    del _sandboxd_setup, Any
