"""What operators see of the runtime: Prometheus metrics, structured logs, probes and a status summary.

:mod:`.events` is what the lifecycle manager calls at each transition; :mod:`.http` observes each
request; :mod:`.endpoints` serves ``/health``, ``/ready``, ``/metrics`` and ``/status``; :mod:`.logs`
formats and redacts every log line; :mod:`.status` is ``sandboxd status``, the client of ``/status``.
"""

from .events import Observer
from .logs import Secrets
from .metrics import RuntimeMetrics

__all__ = ["Observer", "RuntimeMetrics", "Secrets"]
