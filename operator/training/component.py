"""The training kinds' part of the operator's one loop (`kubetune.operator.apply`)."""

from __future__ import annotations

from typing import Any

from kubetune.operator.apply import Component
from kubetune.operator.plan import Plan
from kubetune.operator.training.decide import needs_reconcile, reconcile, report_forbidden
from kubetune.operator.training.observe import observe


def _observe(kube: Any, cr: dict[str, Any], config: Any) -> Any:
    return observe(kube, cr, config.training)


def _decide(cr: dict[str, Any], observed: Any, config: Any) -> Plan:
    return reconcile(cr, observed, options=config.training)


def component(kind: str) -> Component:
    """The loop's part for one training kind (`config` is the operator's `OperatorConfig`)."""
    return Component(kind=kind, observe=_observe, decide=_decide, report_forbidden=report_forbidden,
                     needs_reconcile=needs_reconcile)
