"""TorchServe adapter: any registered scorer as a TorchServe model (``python -m services.torchserve``).

Optional (``pip install -e ".[torchserve]"``, Java 17 at run time). TorchServe's upstream repository
is archived and receives no security fixes, so this adapter exists for sites that already run it; the
native gRPC server (``services.serve``) is the primary path, with per-team tokens, fair queues and
quotas that TorchServe does not have. See docs/deploy.md.
"""
