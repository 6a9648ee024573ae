"""``config.properties`` for a TorchServe that serves our archives, locked down by default.

- Loopback everywhere unless ``host`` says otherwise; the management API (REST and gRPC) stays on
  loopback even then, and model registration through it is off (``enable_model_api=false``), so the
  set of models is exactly the archives listed here.
- Token authorization on: TorchServe writes its keys to ``key_file.json`` in its working directory;
  clients send ``authorization: Bearer <inference key>``.
- Batching per model: ``batchSize`` requests or ``maxBatchDelay`` ms, whichever comes first.
- Request size and connection age mirror the gRPC server, so the same clients fit both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.torchserve.spec import ArchiveSpec

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Addresses and server-wide limits of one TorchServe instance."""

    host: str = LOOPBACK
    """Bind address of the inference and metrics APIs (``0.0.0.0`` in a container)."""
    inference_port: int = 8080
    """REST inference API port."""
    management_port: int = 8081
    """REST management API port (bound to loopback whatever ``host`` is)."""
    metrics_port: int = 8082
    """Prometheus metrics port."""
    grpc_inference_port: int = 7070
    """gRPC inference API port."""
    grpc_management_port: int = 7071
    """gRPC management API port (loopback)."""
    token_expiration_min: int = 60
    """Lifetime of the generated keys; renew through TorchServe's token API with the management key."""
    max_connection_age_s: float | None = 300.0
    """Close gRPC connections after this age so long-lived clients rebalance across replicas."""
    connection_age_grace_s: float = 30.0
    """Time in-flight calls get to finish on a connection closed for its age."""
    workers_per_model: int = 1
    """One worker per model and device, as the gRPC server runs one process per model."""
    response_timeout_s: int = 120
    """Seconds TorchServe waits for a worker's answer before it restarts the worker."""


def render_properties(model_store: Path, specs: Sequence[ArchiveSpec], settings: ServerSettings) -> str:
    """The text of ``config.properties`` serving ``specs`` (their archives live in ``model_store``)."""
    if not specs:
        raise ValueError("no archives to serve")
    models = {
        spec.scorer: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{spec.scorer}.mar",
                "minWorkers": settings.workers_per_model,
                "maxWorkers": settings.workers_per_model,
                "batchSize": spec.batch_requests,
                "maxBatchDelay": round(spec.max_delay_ms),
                "responseTimeout": settings.response_timeout_s,
            }
        }
        for spec in specs
    }
    max_bytes = max(spec.max_request_bytes for spec in specs)
    host = settings.host
    lines = [
        "# Written by `python -m services.torchserve`; see docs/deploy.md.",
        f"inference_address=http://{host}:{settings.inference_port}",
        f"metrics_address=http://{host}:{settings.metrics_port}",
        f"management_address=http://{LOOPBACK}:{settings.management_port}",
        f"grpc_inference_address={host}",
        f"grpc_inference_port={settings.grpc_inference_port}",
        f"grpc_management_address={LOOPBACK}",
        f"grpc_management_port={settings.grpc_management_port}",
        "enable_model_api=false",
        "disable_token_authorization=false",
        f"token_expiration_min={settings.token_expiration_min}",
        # No per-model pip installs and no environment overrides of this file at start-up.
        "install_py_dep_per_model=false",
        "enable_envvars_config=false",
        f"model_store={model_store}",
        # Only archives already in the model store, never a URL, should registration ever be enabled.
        "allowed_urls=" + _properties_escape("file://" + re.escape(str(model_store)) + r"/[^/]+\.mar"),
        "load_models=" + ",".join(f"{spec.scorer}.mar" for spec in specs),
        "models=" + json.dumps(models, sort_keys=True),
        f"max_request_size={max_bytes}",
        f"max_response_size={max_bytes}",
        f"default_response_timeout={settings.response_timeout_s}",
    ]
    if settings.max_connection_age_s is not None:
        age_ms = round(settings.max_connection_age_s * 1000)
        grace_ms = round(settings.connection_age_grace_s * 1000)
        lines.append(f"grpc_inference_max_connection_age_ms={age_ms}")
        lines.append(f"grpc_inference_max_connection_age_grace_ms={grace_ms}")
    return "\n".join(lines) + "\n"


def _properties_escape(value: str) -> str:
    # java.util.Properties treats a backslash as an escape; a regex needs it literally.
    return value.replace("\\", "\\\\")
