"""Templates: building the Debian ``base``, and what a built template costs a create.

* create→first command (``Sandbox.create`` + ``commands.run("true")``) on ``base`` (Debian, its own
  login profile) beside the same on ``host`` (the host's ``/usr`` with a three-line profile), same
  runtime, same run. Quick and full.
* a template built with the SDK's ``Template`` builder (``from_template("base")``, a ``run_cmd`` and
  ``set_envs``): the rebuild of an unchanged template (every step cached) beside a build whose
  step changed (a fresh build sandbox, the step, the layer), medians; and create→first command
  from the built template beside ``base``, interleaved. Quick and full.
* per-step caching, with a template of a slow step (1 s and 16 MiB written) and a quick last one: the
  rebuild with only the last step changed (the slow step ``CACHED``, the build resumes over its
  layer) beside the build with every step run; and that build (a layer cut after the slow step,
  the next sandbox over it) beside the same commands as one step (one layer): what a cut costs.
  Quick and full.
* (full only) the build of ``base`` from an empty template store (everything downloaded) beside a
  plain ``mmdebstrap --variant=apt`` of the same suite from the same mirror (Debian's minimal system
  with apt: what any Debian rootfs costs); then the build again with the packages cached (warm: no
  download) beside the empty-store build; and a build whose recipe is cached (a lookup). The
  report also says whether the two builds produced identical trees (``SOURCE_DATE_EPOCH``).

The shared store (``$SANDBOXD_TEMPLATE_STORE``, ``.cache/templates``) is used for the creates, so the
build is not repeated per run; the build measurements use fresh stores of their own under the
scenario's temp dir.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from .common import Context, Result, ScenarioSkipped, ensure_base, percentile, samples_row
from .runtime import Runtime, sdk_env

WARMUP = 3


def _create_first_command(rt: Runtime, template: str, n: int, warmup: bool) -> list[float]:
    from e2b import Sandbox

    samples: list[float] = []
    skip = WARMUP if warmup else 0
    for i in range(skip + n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(template=template)
        rt.created.add(sbx.sandbox_id)
        result = sbx.commands.run("true")
        elapsed = (time.perf_counter() - t0) * 1e3
        sbx.kill()
        if result.exit_code != 0:
            raise RuntimeError(f"run('true') in {template} exited {result.exit_code}")
        if i >= skip:
            samples.append(elapsed)
    return samples


def _build_template(name: str, marker: str) -> float:
    """Seconds for ``Template.build`` of a small template whose one command writes ``marker``."""
    from e2b import Template

    template = (
        Template()
        .from_template("base")
        .run_cmd(f"echo {marker} > /opt/bench-marker", user="root")
        .set_envs({"BENCH_MARKER": marker})
    )
    t0 = time.perf_counter()
    Template.build(template, name)
    return time.perf_counter() - t0


def _build_time(name: str, ours: list[float], baseline: list[float], baseline_name: str) -> Result:
    """A build-time row: our rounds' p50 beside the baseline's, in seconds, both sample lists kept."""
    return samples_row(name, "s (p50)", ours, baseline, baseline_name, tail=False, extra={"rounds": len(ours)})


def _measure_template_builds(ctx: Context, rt: Runtime) -> tuple[str, Result]:
    """Builds with a changed step (cold) and rebuilds of an unchanged template (warm), taking turns;
    returns the last built template's name and the result."""
    rounds = 2 if ctx.quick else 5
    ctx.log(f"Template.build: {rounds} builds with a changed step and {rounds} unchanged rebuilds, taking turns")
    cold: list[float] = []
    warm: list[float] = []
    run_id = secrets.token_hex(4)
    name = ""
    for i in range(rounds):
        marker = f"{run_id}-{i}"
        name = f"bench-{run_id}-{i}"
        cold.append(_build_template(name, marker))
        warm.append(_build_template(f"{name}-again", marker))
    ctx.log(f"  changed step p50 {percentile(cold, 50):.2f} s; unchanged p50 {percentile(warm, 50):.2f} s")
    result = _build_time(
        "templates: Template.build of an unchanged template (every step cached)",
        warm,
        cold,
        "the same template with its step changed (build sandbox, step, layer)",
    )
    return name, result


def _build_steps(name: str, marker: str, last: str, one_step: bool = False) -> float:
    """Seconds for ``Template.build`` of a slow step (written ``marker``) and a quick last one."""
    from e2b import Template

    slow = f"head -c 16M /dev/urandom > /opt/bench-data && echo {marker} > /opt/bench-marker && sleep 1"
    quick = f"echo {last} > /opt/bench-last"
    template = Template().from_template("base")
    if one_step:
        template = template.run_cmd(f"{slow} && {quick}", user="root")
    else:
        template = template.run_cmd(slow, user="root").run_cmd(quick, user="root")
    t0 = time.perf_counter()
    Template.build(template, name)
    return time.perf_counter() - t0


def _measure_step_cache(ctx: Context) -> list[Result]:
    """Builds of every step, rebuilds with the last step changed, and the same commands as one step,
    taking turns."""
    rounds = 2 if ctx.quick else 5
    ctx.log(f"per-step cache: {rounds} rounds of a full build, a last-step rebuild and a one-step build")
    full: list[float] = []
    last_changed: list[float] = []
    one_step: list[float] = []
    run_id = secrets.token_hex(4)
    for i in range(rounds):
        marker = f"{run_id}-{i}"
        full.append(_build_steps(f"bench-steps-{marker}", marker, "a"))
        last_changed.append(_build_steps(f"bench-steps-{marker}-b", marker, "b"))
        one_step.append(_build_steps(f"bench-steps-{marker}-one", marker, "a", one_step=True))
    ctx.log(
        f"  every step p50 {percentile(full, 50):.2f} s; last step changed p50 {percentile(last_changed, 50):.2f} s;"
        f" as one step p50 {percentile(one_step, 50):.2f} s"
    )
    return [
        _build_time(
            "templates: rebuild with the last step changed (earlier steps CACHED, resumed over their layer)",
            last_changed,
            full,
            "the build running every step (a slow first step: 1 s, 16 MiB)",
        ),
        _build_time(
            "templates: a build with a layer cut after its slow step (two layers, two build sandboxes)",
            full,
            one_step,
            "the same commands as one step (one layer, one build sandbox)",
        ),
    ]


def _measure_built_template(ctx: Context, n: int) -> None:
    """Template.build cold and warm, then create→first command from the built template beside base,
    on a runtime of its own (a fresh one: see the report of issue 14 part 2 on back-to-back creates)."""
    work = ctx.tmp / "built"
    work.mkdir(exist_ok=True)
    rt = Runtime(work, max_sandboxes=64)
    try:
        with sdk_env(rt):
            built, builds = _measure_template_builds(ctx, rt)
            steps = _measure_step_cache(ctx)
            ctx.log(f"create→first command, {n} each, base and the built template taking turns")
            on_base: list[float] = []
            on_built: list[float] = []
            for _ in range(n):
                on_base += _create_first_command(rt, "base", 1, warmup=not on_base)
                on_built += _create_first_command(rt, built, 1, warmup=not on_built)
    finally:
        rt.stop()
    ctx.log(f"  built p50 {percentile(on_built, 50):.1f} ms; base p50 {percentile(on_base, 50):.1f} ms")
    ctx.report(builds)
    for result in steps:
        ctx.report(result)
    ctx.report(
        _create_latency(
            "templates: create→first command on a template built with Template() (one layer over base)",
            on_built,
            on_base,
            "the same on base, same runtime, taking turns",
        )
    )


def _create_latency(name: str, ours: list[float], baseline: list[float], baseline_name: str) -> Result:
    """A create→first command row: our samples' p50 beside the baseline's, both p99s kept."""
    return samples_row(name, "ms (p50)", ours, baseline, baseline_name, extra={"n": len(ours)})


def _tree_digest(path: Path) -> str:
    """sha256 of a canonical tar of the tree (the layer store's own serialisation)."""
    from sandboxd.runtime.layers import canonical_tar

    sha = hashlib.sha256()
    with subprocess.Popen(canonical_tar(path), stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        while chunk := process.stdout.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _measure_builds(ctx: Context) -> None:
    from sandboxd.runtime import debian
    from sandboxd.runtime.layers import LayerStore, hex_of

    mirror = os.environ.get("SANDBOXD_DEBIAN_MIRROR") or debian.DEFAULT_MIRROR
    recipe = debian.Recipe(mirror=mirror)
    try:
        debian.probe(recipe)
    except debian.BuildUnavailable as exc:
        ctx.log(f"base build not measured: {exc}")
        return

    ctx.log(f"baseline: mmdebstrap --variant=apt {recipe.suite} from {mirror} (Debian's minimal system)")
    minimal = ctx.tmp / "minimal"
    t0 = time.monotonic()
    subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("mmdebstrap", "--quiet", "--mode=root", "--variant=apt", recipe.suite, str(minimal), mirror),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    minimal_s = time.monotonic() - t0
    shutil.rmtree(minimal, ignore_errors=True)
    ctx.log(f"  {minimal_s:.0f} s")

    store = LayerStore(ctx.tmp / "store")
    timings: dict[str, float] = {}
    digests: dict[str, str] = {}
    for kind in ("cold", "warm", "cached"):
        if kind == "warm":  # keep the downloaded packages, drop the build
            layer = recipe.key()
            digests["cold"] = _tree_digest(store.path(layer))
            store.uncache(layer)
            store.remove(layer)
        ctx.log(f"building base, {kind}")
        t0 = time.monotonic()
        debian.build(store, recipe, debian.BuildProgress(), lambda line: None)
        timings[kind] = time.monotonic() - t0
        ctx.log(f"  {timings[kind]:.1f} s")
    digests["warm"] = _tree_digest(store.path(recipe.key()))
    identical = digests["cold"] == digests["warm"]
    ctx.log(f"  cold and warm builds identical: {identical}")
    info = store.info(recipe.key())
    extra = {
        "suite": recipe.suite,
        "mirror": mirror,
        "size_mib": round(info.size / (1 << 20)) if info else None,
        "files": info.entries if info else None,
        "downloaded_mib": round(sum(p.stat().st_size for p in (store.root / "apt-cache").glob("*.deb")) / (1 << 20)),
        "cold_and_warm_identical": identical,
        "layer": hex_of(recipe.key())[:12],
    }
    ctx.report(
        Result(
            name="templates: build base from an empty store (download + install)",
            unit="s",
            ours=timings["cold"],
            baseline=minimal_s,
            baseline_name=f"mmdebstrap --variant=apt {recipe.suite}, same mirror (minimal Debian with apt)",
            better="lower",
            extra=extra,
        )
    )
    ctx.report(
        Result(
            name="templates: build base again, packages cached (no download)",
            unit="s",
            ours=timings["warm"],
            baseline=timings["cold"],
            baseline_name="the same build from an empty store (above)",
            better="lower",
            extra={"cold_and_warm_identical": identical},
        )
    )
    ctx.report(
        Result(
            name="templates: base when its recipe is built already (cache lookup)",
            unit="s",
            ours=timings["cached"],
            baseline=timings["warm"],
            baseline_name="building it with the packages cached (above)",
            better="lower",
        )
    )
    shutil.rmtree(store.root, ignore_errors=True)


def run(ctx: Context) -> None:
    if os.geteuid() != 0:
        raise ScenarioSkipped("needs root: sandboxd serve and mmdebstrap --mode=root")
    if not ensure_base(ctx):
        raise ScenarioSkipped("the base template cannot be built here (no Debian archive in reach or no mmdebstrap)")
    n = 15 if ctx.quick else 50
    rt = Runtime(ctx.tmp, max_sandboxes=64)
    try:
        with sdk_env(rt):
            ctx.log(f"create→first command, {n} each (after {WARMUP} untimed), host and base taking turns")
            host: list[float] = []
            base: list[float] = []
            for _ in range(n):  # interleaved, so load on the machine falls on both alike
                host += _create_first_command(rt, "host", 1, warmup=not host)
                base += _create_first_command(rt, "base", 1, warmup=not base)
    finally:
        rt.stop()
    ctx.log(
        f"  base p50 {percentile(base, 50):.1f} ms p99 {percentile(base, 99):.1f} ms; "
        f"host p50 {percentile(host, 50):.1f} ms p99 {percentile(host, 99):.1f} ms"
    )
    ctx.report(
        _create_latency(
            'templates: create→first command on base (Debian), Sandbox.create + commands.run("true")',
            base,
            host,
            "the same on template host (host /usr, minimal login profile)",
        )
    )
    _measure_built_template(ctx, n)
    if not ctx.quick:
        _measure_builds(ctx)
