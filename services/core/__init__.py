"""Reward serving core: wire codec, fair dynamic batcher, auth/TLS, metrics, gRPC server.

Nothing here knows about a particular reward model: a scorer (see :mod:`services.core.scorer`) is
plugged in, and the same scorer object also runs in-process and under TorchServe.
"""
