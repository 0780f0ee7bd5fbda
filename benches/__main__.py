"""``python -m benches [--quick] [--only NAME ...] [--compare-agent URL]``: run the scenarios, print and save a report.

Exit status: 0 when every scenario ran (whatever the numbers), 1 when a scenario raised, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import chart, commands, files, interpreter, kube, network, observe, runtime, sdk_files, templates, watch
from .common import (
    Agent,
    Context,
    RemoteAgent,
    Result,
    ScenarioSkipped,
    extension_build,
    fs_type,
    pick_tmp_root,
    write_report,
)

SCENARIOS: dict[str, Callable[[Context], None]] = {
    "files": files.run,
    "sdk-files": sdk_files.run,
    "watch": watch.run,
    "commands": commands.run,
    "runtime": runtime.run,
    "observe": observe.run,
    "network": network.run,
    "templates": templates.run,
    "interpreter": interpreter.run,
    "kube": kube.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benches", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one run each (a few minutes)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=sorted(SCENARIOS), help=f"run only these ({', '.join(SCENARIOS)})"
    )
    parser.add_argument(
        "--runs", type=int, metavar="N", help="repeat each timed measurement N times (default 3; quick: 1)"
    )
    parser.add_argument(
        "--compare-agent",
        metavar="URL",
        help="an already-running envd-compatible agent on this machine (e.g. E2B's envd): the files, sdk-files, "
        "watch and commands scenarios also drive it (curl, the official SDK, the binary client) and report "
        "ours/its ratio; it must see this machine's filesystem",
    )
    parser.add_argument("--compare-agent-token", metavar="TOKEN", help="X-Access-Token for --compare-agent")
    parser.add_argument("--tmpdir", help="where to put temporary files (default: $TMPDIR or /tmp unless tmpfs)")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    names = args.only or list(SCENARIOS)
    tmp_root = pick_tmp_root(args.tmpdir)
    compare = RemoteAgent.at(args.compare_agent, args.compare_agent_token) if args.compare_agent else None
    if compare is not None:
        compare.check()
        seen = f"pid {compare.ps.pid}" if compare.ps is not None else "its process is not visible: no RSS/CPU"
        print(f"comparing with {compare.name} ({compare.url}; {seen})", flush=True)
    mode = "quick" if args.quick else "full"
    print(f"sandboxd benches ({mode}): {', '.join(names)}; temp files in {tmp_root} ({fs_type(tmp_root)})", flush=True)
    if extension_build() == "debug":
        print(
            "WARNING: sandboxd's Rust extension is a debug build; the figures will not be representative. "
            "Build it in release mode first (`make install`, or `make dev` after a Rust change).",
            flush=True,
        )

    results: list[Result] = []
    errors: list[dict[str, str]] = []
    for name in names:
        print(f"\n[{name}]", flush=True)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"sandboxd-bench-{name}-", dir=tmp_root))
        agent: Agent | None = None
        try:
            agent = Agent(tmp)
            ctx = Context(
                quick=args.quick, runs=args.runs, tmp=tmp, agent=agent, compare_agent=compare, sink=results.append
            )
            SCENARIOS[name](ctx)
        except ScenarioSkipped as exc:
            print(f"  SKIP {name}: {exc}", flush=True)
        except KeyboardInterrupt:
            print(f"  interrupted in {name}; cleaning up", flush=True)
            errors.append({"scenario": name, "error": "interrupted"})
            break
        except Exception as exc:
            traceback.print_exc()
            errors.append({"scenario": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        finally:
            if agent is not None:
                agent.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"  {name} took {time.monotonic() - started:.0f}s", flush=True)

    run_args = {"quick": args.quick, "runs": args.runs, "only": args.only, "compare_agent": args.compare_agent}
    path, md = write_report(results, errors, run_args)
    print()
    print(md)
    png = chart.write_chart(results, path.with_suffix(".png"), md.splitlines()[0].removeprefix("## "))
    also = f", {png.name}" if png is not None else ""
    print(f"wrote {path}, {path.with_suffix('.md').name}{also}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
