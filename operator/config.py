"""The operator's typed configuration: what `kubetune operator`'s flags decide.

Nothing is read at import time and nothing travels through environment variables: the flags
become one `OperatorConfig` (`config_from_args`), the handlers are registered into a registry
built for it (`handlers.register`), and kopf hands it to every handler in its `memo` (`main.run`).
A test builds the same registry with any config it likes, in-process.

A few settings are read from the environment once, here, because the Helm chart sets them for
every replica (`KUBETUNE_KOPF_SCANNING`, `KUBETUNE_WATCH_TIMEOUT`, `KUBETUNE_KOPF_EVENTS`) or a
test harness needs them (`KUBETUNE_WEBHOOK_ADDR`, `KUBETUNE_WEBHOOK_INSECURE`).
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.common import StorageDefaults
from kubetune.operator.overrides import PlatformDefaults
from kubetune.operator.serving.render import ServingOptions
from kubetune.operator.training.render import RenderOptions

DEFAULT_RECONCILE_INTERVAL = 10.0


@dataclass(frozen=True)
class WebhookConfig:
    """The validating admission webhook's server (kopf serves it)."""

    port: int
    addr: str = "0.0.0.0"
    host: str | None = None
    cert: str | None = None
    key: str | None = None
    managed: str | None = None
    """The ValidatingWebhookConfiguration kopf creates/updates (None: someone else manages it)."""
    insecure: bool = False


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator's flags decide, passed to every handler in kopf's memo."""

    training: RenderOptions = field(default_factory=RenderOptions)
    serving: ServingOptions = field(default_factory=ServingOptions)
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    """Seconds between observations of a resource in flight (its Job, status.json)."""
    metrics_port: int | None = None
    webhook: WebhookConfig | None = None
    kopf_events: bool = True
    """Let kopf post its own log lines as events (ours are always posted)."""
    scanning: bool = True
    """kopf's cluster scanning for namespaces/CRDs (the chart turns it off: no cluster-wide list)."""
    watch_timeout: int = 300

    @property
    def gpu_memory_gib(self) -> float | None:
        return self.training.gpu_memory_gib


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def load_platform_defaults(path: str | None = None, values: str | None = None) -> PlatformDefaults | None:
    """The platform's defaults from `--platform-defaults FILE` (YAML or JSON: what the chart's
    `platformDefaults` value holds, mounted from a ConfigMap) or, for `kubetune render`, the
    `platformDefaults` key of a chart values file (`--values`). None when neither is given;
    a SpecErrors naming the field when the document is wrong."""
    from pydantic import ValidationError

    from kubetune.trainer.api.errors import SpecError, SpecErrors, validation_error_to_spec_errors
    from kubetune.trainer.artifacts.documents import read_yaml

    source = path or values
    if source is None:
        return None
    document = read_yaml(source)
    if values and not path:
        document = (document or {}).get("platformDefaults") if isinstance(document, dict) else None
    if document is None or document == {}:
        return None
    if not isinstance(document, dict):
        raise SpecError(source, "platform defaults must be a mapping (podTemplate, nodeSelector, tolerations).",
                        "see the chart's platformDefaults value.")
    prefix = "platformDefaults" if values and not path else ""
    try:
        defaults = PlatformDefaults.model_validate(document)
    except ValidationError as exc:
        raise SpecErrors(validation_error_to_spec_errors(exc, PlatformDefaults, prefix), source) from None
    from kubetune.operator.validation import platform_default_conflicts

    conflicts = platform_default_conflicts(defaults)
    if conflicts:
        raise SpecErrors(conflicts, source)
    return defaults


CHART_VALUE_FLAGS = (
    ("trainer_image", ("jobs", "trainerImage")), ("server_image", ("jobs", "serverImage")),
    ("vllm_image", ("serving", "vllmImage")), ("host_cache_root", ("serving", "hostPathCacheRoot")),
    ("prometheus_address", ("serving", "prometheusAddress")), ("default_s3_endpoint", ("jobs", "s3", "endpoint")),
    ("default_s3_endpoint", ("s3", "endpoint")), ("default_s3_secret", ("jobs", "s3", "existingSecret")),
    ("gpu_memory_gib", ("jobs", "gpuMemoryGiB")),
)
"""The chart values the Deployment template turns into the operator's flags (deployment.yaml)."""


def with_chart_values(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the flags the chart would pass, from `--values FILE` (a flag given on the
    command line wins), so `kubetune render --values` shows what that release's operator creates."""
    from kubetune.trainer.artifacts.documents import read_yaml

    if not getattr(args, "values", None):
        return args
    values = read_yaml(args.values)
    values = values if isinstance(values, dict) else {}
    out = argparse.Namespace(**vars(args))
    for flag, path in CHART_VALUE_FLAGS:
        node: Any = values
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node and not getattr(out, flag, None):
            setattr(out, flag, float(node) if flag == "gpu_memory_gib" else str(node))
    return out


def platform_config(args: argparse.Namespace) -> OperatorConfig:
    """The settings that shape the pods (images, S3 defaults, cache root, GPU memory, the
    platform's pod defaults): what `kubetune render` takes from the same flags as `kubetune operator`."""
    storage = StorageDefaults(endpoint=args.default_s3_endpoint or None, secret=args.default_s3_secret or None)
    defaults = load_platform_defaults(getattr(args, "platform_defaults", None), getattr(args, "values", None))
    training = RenderOptions(storage_defaults=storage, gpu_memory_gib=args.gpu_memory_gib, platform_defaults=defaults,
                             **({"default_image": args.trainer_image} if args.trainer_image else {}))
    serving_kwargs: dict[str, Any] = {"default_image": args.server_image or None, "storage_defaults": storage,
                                      "platform_defaults": defaults, "gpu_memory_gib": args.gpu_memory_gib}
    for value, key in ((args.vllm_image, "vllm_image"), (args.trainer_image, "trainer_image"),
                       (args.host_cache_root, "host_cache_root"),
                       (getattr(args, "prometheus_address", None), "prometheus_address")):
        if value:
            serving_kwargs[key] = value
    return OperatorConfig(training=training, serving=ServingOptions(**serving_kwargs))


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """The configuration `kubetune operator ARGS` runs with."""
    env = os.environ if environ is None else environ
    platform = platform_config(args)
    webhook = None
    if args.webhook_port is not None:
        webhook = WebhookConfig(port=args.webhook_port, addr=env.get("KUBETUNE_WEBHOOK_ADDR", "0.0.0.0"),
                                host=args.webhook_host or None, cert=args.webhook_cert or None,
                                key=args.webhook_key or None, managed=args.webhook_managed or None,
                                insecure=_flag(env.get("KUBETUNE_WEBHOOK_INSECURE"), False))
    return OperatorConfig(
        training=platform.training,
        serving=platform.serving,
        reconcile_interval=args.reconcile_interval or DEFAULT_RECONCILE_INTERVAL,
        metrics_port=args.metrics_port,
        webhook=webhook,
        kopf_events=_flag(env.get("KUBETUNE_KOPF_EVENTS"), True),
        scanning=_flag(env.get("KUBETUNE_KOPF_SCANNING"), True),
        watch_timeout=int(env.get("KUBETUNE_WATCH_TIMEOUT", "300")),
    )


class Locks:
    """One lock per resource: its handlers (change, timer, a child's event) never overlap."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def of(self, kind: str, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((kind, namespace, name), threading.Lock())
