"""InferenceService's part of the operator's one loop (`kubetune.operator.apply`)."""

from __future__ import annotations

from typing import Any

from kubetune.operator.apply import Component
from kubetune.operator.plan import Plan
from kubetune.operator.serving.decide import reconcile_service, report_forbidden
from kubetune.operator.serving.observe import observe_service

KIND = "InferenceService"


def _observe(kube: Any, cr: dict[str, Any], config: Any) -> Any:
    return observe_service(kube, cr, config.serving)


def _decide(cr: dict[str, Any], observed: Any, config: Any) -> Plan:
    return reconcile_service(cr, observed, options=config.serving)


COMPONENT = Component(kind=KIND, observe=_observe, decide=_decide, report_forbidden=report_forbidden)
