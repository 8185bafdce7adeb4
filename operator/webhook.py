"""The validating admission webhook: kopf serves it, `validation.admit` decides.

The decision is the very function `kubetune validate` applies to a manifest, so a manifest that
passes locally is one `kubectl apply` accepts; a refusal is the same one-paragraph message.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.operator.validation import AdmissionRefused, admit


def validate_handler(body: kopf.Body, old: Any, operation: str | None, warnings: list[str],
                     memo: kopf.Memo, **_: Any) -> None:
    """Refuse a bad spec with the message `kubetune validate` prints; pass on its warnings."""
    config = getattr(memo, "config", None)
    try:
        warnings.extend(admit(operation, dict(old) if old else None, dict(body),
                              default_gib=config.gpu_memory_gib if config else None))
    except AdmissionRefused as exc:
        raise kopf.AdmissionError(str(exc), code=422) from None


def configure_webhook(settings: kopf.OperatorSettings, webhook: Any) -> None:
    """kopf's webhook server (and, with `managed`, the ValidatingWebhookConfiguration it keeps)."""
    settings.admission.server = kopf.WebhookServer(
        addr=webhook.addr, port=webhook.port, host=webhook.host,
        certfile=webhook.cert, pkeyfile=webhook.key, insecure=webhook.insecure,
    )
    if webhook.managed:
        settings.admission.managed = webhook.managed
