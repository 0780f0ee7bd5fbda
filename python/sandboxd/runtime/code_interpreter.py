"""The ``code-interpreter-v1`` template: ``base`` plus what ``runCode`` needs, as one layer on top of it.

This is the recipe, in one place: what the layer contains and why. It is built like ``base``: once,
on first need (or ``sandboxd template build code-interpreter-v1``), with progress, cached in the
template store under the hash of everything below, and shared by every runtime using the store.
The step runs in a chroot over ``base``'s layer (:mod:`.layer_step`), so the result is a layer that
lists ``base`` beneath it, never a copy of it.

What E2B's template has (e2b-dev/code-interpreter ``template/``: ``template.py`` and
``requirements.txt``), and what this one takes of it:

* **Kernels**: ipykernel (Python), bash_kernel, Deno's kernel for JavaScript and TypeScript (E2B:
  its ijavascript fork; why Deno is in ``sandboxd/interpreter/languages.py``), and IRkernel for R,
  with their kernelspecs in ``/usr/local/share/jupyter/kernels`` (R's named ``r``, as E2B's
  ``installspec(name = 'r')`` names it). R and IRkernel are Debian's ``r-base-core`` and
  ``r-cran-irkernel``, from the archive ``base`` comes from (E2B adds CRAN's apt repository and
  installs IRkernel from CRAN's sources; the archive's build needs neither a compiler nor a third
  source). Without recommends: no ``r-recommended`` library set, no ``r-base-dev``; measured, R adds
  ~110 MiB to the layer and ~15 s to a cold build (``docs/templates.md``). apt's lists and
  downloads stay in the step's cache, not in the layer. **Java**: jjava (PyPI's wheel: the kernel's
  jars and its kernelspec ``java``), the maintained fork of IJava, which E2B installs from GitHub, a
  source out of reach here; it runs on Debian's ``openjdk-21-jdk-headless`` (JShell compiles the
  cells: a JRE is not enough), ~290 MiB, ~25 s of a cold build.
* **What the interpreter's setup cell uses**: ``e2b-charts`` (chart data for matplotlib figures)
  and ``orjson``.
* **The data stack, at E2B's pinned versions**: numpy, pandas, matplotlib, pillow, scipy,
  scikit-learn, scikit-image, seaborn, plotly, bokeh, sympy, xarray, openpyxl, xlrd, python-docx,
  opencv (the ``-headless`` build of the same version: E2B's ``opencv-python`` needs ``libGL``,
  which a template without a display has no use for), imageio, soundfile, nltk, textblob, requests,
  aiohttp, beautifulsoup4, joblib, pytz, tornado, urllib3, pytest.
* **Left out, by size and build time** (measured: see ``docs/templates.md``): ``spacy`` (its
  compiled stack, and it is unusable without a language model downloaded separately), ``gensim``,
  ``librosa`` with ``numba`` and ``llvmlite`` (an LLVM build, ~150 MiB, for audio analysis), and
  ``kaleido`` 1.x (plotly's static export, which drives a Chrome that the template does not have).
  ``jupyter-server`` is not needed: sandboxd drives kernels with ``jupyter_client``. The CJK fonts
  (``fonts-noto-cjk``, E2B's matplotlib default font) are not installed: plots render Latin, Greek
  and Cyrillic with matplotlib's own DejaVu fonts. Each is one ``pip install`` (or ``sudo apt-get
  install``) away inside a sandbox.

Only wheels are installed (``--only-binary :all:``): nothing from a package index runs as root on
the host during the build. Versions are pinned as E2B pins them; the versions pip resolved for
everything else are recorded beside the layer (``layers/<hex>.packages.tsv``).

Nothing of sandboxd is in the template: the interpreter server comes from the host (forked from the
runtime's zygote like the agent), and the template's config says ``code_interpreter: true`` so that
sandboxes of this template, and of templates built from it, start it.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import debian, layer_step
from .debian import BuildFailed, BuildProgress
from .layers import LayerStore, recipe_digest

NAME = "code-interpreter-v1"
"""The template's name: the default of both code-interpreter SDKs."""

DEFAULT_INDEX = "https://pypi.org/simple"

PACKAGES = (
    # the kernels, and what the interpreter's setup cell imports
    "ipykernel==6.31.0",
    "ipython==9.15.0",
    "bash_kernel==0.10.0",
    "deno==2.9.8",
    "e2b-charts==1.0.0",
    "orjson==3.11.9",
    "jjava==1.0a8",
    # E2B's data stack (template/requirements.txt), at its versions
    "numpy==2.3.5",
    "pandas==2.2.3",
    "matplotlib==3.10.9",
    "pillow==12.3.0",
    "scipy==1.17.1",
    "scikit-learn==1.6.1",
    "scikit-image==0.25.2",
    "seaborn==0.13.2",
    "plotly==6.0.1",
    "bokeh==3.9.1",
    "sympy==1.14.0",
    "xarray==2025.4.0",
    "openpyxl==3.1.5",
    "xlrd==2.0.2",
    "python-docx==1.1.2",
    "opencv-python-headless==4.11.0.86",
    "imageio==2.37.3",
    "soundfile==0.13.1",
    "nltk==3.10.0",
    "textblob==0.19.0",
    "requests==2.33.0",
    "aiohttp==3.14.3",
    "beautifulsoup4==4.15.0",
    "joblib==1.5.3",
    "pytz==2025.2",
    "tornado==6.5.7",
    "urllib3==2.7.0",
    "pytest==9.0.3",
)

DEBIAN_PACKAGES = ("r-base-core", "r-cran-irkernel", "openjdk-21-jdk-headless")
"""R and its Jupyter kernel, and the JDK the Java kernel runs on (it compiles cells with JShell, which
a JRE lacks), from the Debian archive ``base`` comes from (E2B: CRAN's R and IRkernel, OpenJDK)."""

STEP = r"""
echo "sandboxd-phase: installing R, IRkernel and a JDK from Debian's archive"
# apt's lists and downloads stay in the step's cache (not in the layer; a rebuild downloads nothing new)
mkdir -p CACHE/apt/lists/partial CACHE/apt/archives/partial
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -o Dir::State::Lists=CACHE/apt/lists \
        -o Dir::Cache::archives=CACHE/apt/archives -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
        -o Acquire::Languages=none -o Acquire::Retries=3 "$@"
}
apt_get update
apt_get install -y --no-install-recommends DEBIAN_PACKAGES
echo "sandboxd-phase: downloading Python packages"
python3 -m pip install --only-binary :all: --progress-bar off --no-warn-script-location \
    --index-url "$INDEX_URL" -r /dev/stdin <<'EOF'
PACKAGES
EOF
echo "sandboxd-phase: installing kernelspecs and warming caches"
python3 -m bash_kernel.install --prefix /usr/local >/dev/null
mkdir -p /usr/local/share/jupyter/kernels/deno
cat > /usr/local/share/jupyter/kernels/deno/kernel.json <<'EOF'
{"argv": ["/usr/local/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
 "display_name": "Deno", "language": "typescript"}
EOF
test -f /usr/local/share/jupyter/kernels/python3/kernel.json
# IRkernel's own kernelspec, named "r" as E2B's template names it (installspec(name = 'r'))
mkdir -p /usr/local/share/jupyter/kernels/r
cat > /usr/local/share/jupyter/kernels/r/kernel.json <<'EOF'
{"argv": ["/usr/bin/R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
 "display_name": "R", "language": "R"}
EOF
R --slave -e 'library(IRkernel)'
# jjava's kernelspec, named "java" (E2B's IJava's name), as its wheel installs it
test -f /usr/local/share/jupyter/kernels/java/kernel.json
test -f /usr/local/share/jupyter/kernels/java/jjava.jar
java -version 2>&1 | head -1
# matplotlib builds its font list on first import (seconds): once here, for root, whose kernels use it
python3 -c 'import matplotlib.pyplot'
python3 -m pip list --format=freeze | sed 's/==/\t/' > /.sandboxd-packages
dpkg-query -W -f '${Package}\t${Version}\n' DEBIAN_PACKAGES >> /.sandboxd-packages
"""
STEP = (
    STEP.replace("DEBIAN_PACKAGES", " ".join(DEBIAN_PACKAGES))
    .replace("PACKAGES", "\n".join(PACKAGES))
    .replace("CACHE", layer_step.CACHE_DIR)
)
"""The step, run as root in a chroot over ``base`` (``/bin/sh -eu``)."""

CONFIG: dict[str, Any] = {**debian.CONFIG, "code_interpreter": True}
"""``base``'s config, and the flag that starts the code interpreter in this template's sandboxes."""

RECIPE_VERSION = 1
"""Bump when the build changes in a way the recipe below does not show."""


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything the layer depends on: ``base``'s recipe beneath it, and the step."""

    base: debian.Recipe
    index_url: str = DEFAULT_INDEX

    def key(self) -> str:
        """The build cache key, which is also the layer's digest."""
        recipe = {
            "version": RECIPE_VERSION,
            "base": self.base.key(),
            "index": self.index_url.rstrip("/"),
            "packages": PACKAGES,
            "debian_packages": DEBIAN_PACKAGES,
            "step": STEP,
            "epoch": debian.SOURCE_DATE_EPOCH,
            "config": CONFIG,
        }
        return recipe_digest(recipe)

    def describe(self) -> str:
        return f"base + kernels and E2B's data stack ({len(PACKAGES)} Python packages from {self.index_url})"


def probe(recipe: Recipe) -> None:
    """Raise :class:`BuildUnavailable` unless the package index answers."""
    debian.probe_url(f"{recipe.index_url.rstrip('/')}/ipykernel/", f"the Python package index at {recipe.index_url}")


def build(
    store: LayerStore,
    recipe: Recipe,
    progress: BuildProgress,
    report: Callable[[str], None],
    processes: list[subprocess.Popen[bytes]] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Build the template into ``store`` (``base`` first, unless it is cached) unless its recipe is
    cached; returns (layers, config), topmost first. Holds the store's lock for this recipe, so
    runtimes and CLIs sharing a store build it once."""
    key = recipe.key()
    with store.lock("code-interpreter-build"):
        cached = store.cached(key)
        if cached is not None:
            return list(cached["layers"]), dict(cached["config"])
        base_layers, _ = debian.build(store, recipe.base, progress, lambda line: report(f"base: {line}"), processes)
        probe(recipe)
        progress.phase, progress.packages_total = "starting", 0
        progress.started = time.monotonic()
        follow = _Follow(progress, report)
        ca = host_ca_bundle()
        try:
            layer_step.run_step(
                store,
                [store.path(d) for d in base_layers],
                STEP,
                key,
                recipe.describe(),
                cache=store.root / "pip-cache",
                inputs={"host-ca.pem": ca} if ca is not None else None,
                env={
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": "/root",
                    "LANG": "C.UTF-8",
                    "SOURCE_DATE_EPOCH": str(debian.SOURCE_DATE_EPOCH),
                    "INDEX_URL": recipe.index_url,
                    "PIP_CACHE_DIR": f"{layer_step.CACHE_DIR}/pip",
                    "PIP_ROOT_USER_ACTION": "ignore",
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                    **({"PIP_CERT": f"{layer_step.INPUTS_DIR}/host-ca.pem"} if ca is not None else {}),
                },
                log_path=store.root / "code-interpreter-build.log",
                on_line=follow,
                processes=processes,
                epoch=debian.SOURCE_DATE_EPOCH,
            )
        except layer_step.StepFailed as exc:
            raise BuildFailed(str(exc)) from None
        progress.phase = "stored"
        report(progress.line())
        layers = [key, *base_layers]
        record = {"layers": layers, "config": CONFIG, "source": recipe.describe(), "built_at": time.time()}
        store.cache_put(key, record)
        return layers, dict(CONFIG)


def host_ca_bundle() -> Path | None:
    """The certificate authorities this host trusts (``$SSL_CERT_FILE``, else OpenSSL's default file),
    for the step's downloads: a host behind a TLS-inspecting proxy trusts that proxy's authority,
    which the template's own trust store does not have (nor gets: the file stays out of the layer)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    return None


class _Follow:
    """Turns the step's output into progress: a line per phase, and one every few seconds while pip
    collects packages (it names each one it resolves)."""

    EVERY_S = 5.0

    def __init__(self, progress: BuildProgress, report: Callable[[str], None]) -> None:
        self.progress = progress
        self.report = report
        self.collected = 0
        self.last = 0.0

    def __call__(self, line: str) -> None:
        if line.startswith(layer_step.PHASE_PREFIX):
            self.progress.phase = line[len(layer_step.PHASE_PREFIX) :].strip()
        elif line.startswith("Collecting "):
            self.collected += 1
            self.progress.phase = f"downloading Python packages ({self.collected} resolved)"
            if time.monotonic() - self.last < self.EVERY_S:
                return
        elif line.startswith("Installing collected packages: "):
            count = len(line.split(":", 1)[1].split(","))
            self.progress.phase = f"installing {count} Python packages"
        else:
            return
        self.last = time.monotonic()
        self.report(self.progress.line())
