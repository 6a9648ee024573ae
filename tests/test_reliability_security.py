"""Security promises beyond tests/test_security.py: authentication on every RPC and before parsing,
fuzzed authorization headers, TLS/mTLS through the command line, nothing secret in metrics, health or
logs, and no unsafe deserialisation anywhere in the product code."""

from __future__ import annotations

import ast
import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import reward_pb2, reward_pb2_grpc
from services.core.codec import encode_raw
from services.core.server import ServerConfig
from tests.conftest import MeanPixelScorer, running_server
from tests.test_reliability_fuzz import server_process
from tests.test_security import TOKEN_A, TOKEN_B, pki  # noqa: F401 - pki is a fixture

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("services", "trainer", "shapes", "protos")
TOKEN_C = "token-of-team-c-a1b2c3d4e5f6a7b8"
SCORE = "/e2po.reward.v1.RewardService/Score"
AUTH_MESSAGES = {
    "missing 'authorization: Bearer <token>' metadata",
    "authorization metadata must be 'Bearer <token>'",
    "invalid token",
}


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _token_file(path: Path) -> Path:
    # team-a: every model; team-b: other models only; team-c: this model only, with a quota.
    path.write_text(
        f"team-a:{TOKEN_A}\nteam-b:{TOKEN_B}:pickscore,geneval\nteam-c:{TOKEN_C}:meanpixel:1000\n"
    )
    return path


def _request(prompt: str = "p", **sample: str) -> reward_pb2.ScoreRequest:
    image = encode_raw(np.full((4, 4, 3), 5, np.uint8))
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image=image, prompt=prompt, **sample)])


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- authentication on every RPC, before anything else --------------------------------------------


def test_every_rpc_and_even_a_corrupt_body_needs_a_valid_token_first(tmp_path: Path) -> None:
    describe, corrupt = reward_pb2.DescribeRequest(), b"\xff\xff\xff"
    cases = [  # (what, method, request, token, expected code)
        ("describe, no token", "Describe", describe, None, "UNAUTHENTICATED"),
        ("describe, wrong token", "Describe", describe, "x" * 32, "UNAUTHENTICATED"),
        ("describe, a model the team may not use", "Describe", describe, TOKEN_B, "PERMISSION_DENIED"),
        # Authentication comes before parsing: an anonymous caller learns nothing about the body.
        ("corrupt body, no token", "raw", corrupt, None, "UNAUTHENTICATED"),
        ("corrupt body, other team", "raw", corrupt, TOKEN_B, "PERMISSION_DENIED"),
        ("corrupt body, valid token", "raw", corrupt, TOKEN_A, "INVALID_ARGUMENT"),
        ("empty request, no token", "Score", reward_pb2.ScoreRequest(), None, "UNAUTHENTICATED"),
        ("score, a model the team may not use", "Score", _request(), TOKEN_B, "PERMISSION_DENIED"),
    ]

    async def main() -> None:
        config = ServerConfig(port=0, token_file=_token_file(tmp_path / "tokens"))
        scorer = MeanPixelScorer()
        async with running_server(scorer, config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                methods = {"Describe": stub.Describe, "Score": stub.Score, "raw": channel.unary_unary(SCORE)}
                for what, method, request, token, code in cases:
                    metadata = _bearer(token) if token else ()
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await methods[method](request, metadata=metadata, timeout=10)
                    assert info.value.code().name == code, (what, info.value.details())
                    for secret in (TOKEN_A, TOKEN_B, TOKEN_C):
                        assert secret not in (info.value.details() or ""), what
                # A team restricted to this model uses it; an unrestricted team describes it.
                ok = await stub.Score(_request(), metadata=_bearer(TOKEN_C), timeout=10)
                assert len(ok.scores) == 1
                info = await stub.Describe(describe, metadata=_bearer(TOKEN_A), timeout=10)
                assert info.name == "meanpixel"
        assert scorer.seen_prompts() == ["p"]  # nothing unauthenticated reached the model

    run(main())


def test_fuzzed_authorization_headers_never_get_in(tmp_path: Path) -> None:
    """Random headers and near-miss tokens (prefixes, case, extra bytes, other schemes)."""
    near_misses = st.sampled_from(
        [TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper(), TOKEN_A[1:], TOKEN_B[:8], TOKEN_C + TOKEN_C]
    )
    schemes = st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""])
    values = st.one_of(
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=120),
        st.builds(lambda scheme, token: f"{scheme} {token}", schemes, near_misses),
        st.just("Bearer"),
    )
    num_cases = 300

    async def main() -> int:
        config = ServerConfig(port=0, token_file=_token_file(tmp_path / "tokens"))
        scorer = MeanPixelScorer()
        tried = 0
        async with running_server(scorer, config) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                loop = asyncio.get_running_loop()

                async def attempt(header: str) -> tuple[grpc.StatusCode, str]:
                    try:
                        await stub.Score(_request(), metadata=(("authorization", header),), timeout=10)
                    except grpc.aio.AioRpcError as err:
                        return err.code(), err.details() or ""
                    return grpc.StatusCode.OK, ""

                @settings(
                    max_examples=num_cases,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(header=values)
                def one(header: str) -> None:
                    nonlocal tried
                    # hypothesis drives from a worker thread; the call itself runs on the server's loop
                    code, details = asyncio.run_coroutine_threadsafe(attempt(header), loop).result(30)
                    tried += 1
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (header, code, details)
                    assert details in AUTH_MESSAGES, details  # fixed sentences: the header is never echoed

                await asyncio.to_thread(one)
        assert scorer.seen_prompts() == []
        return tried

    assert run(main()) >= num_cases


# -- TLS and mTLS through the command line ----------------------------------------------------------


def test_served_mtls_refuses_plaintext_and_untrusted_client_certificates(
    tmp_path: Path,
    pki: dict[str, Path],  # noqa: F811 - the fixture imported from tests.test_security
) -> None:
    args = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    args += ["--tls-client-ca", str(pki["ca"]), "--log-level", "WARNING"]

    def score(endpoint: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        channel = (
            grpc.secure_channel(endpoint, credentials)
            if credentials is not None
            else grpc.insecure_channel(endpoint)
        )
        with channel:
            try:
                reward_pb2_grpc.RewardServiceStub(channel).Score(_request(), timeout=10)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    read = Path.read_bytes
    with server_process(tmp_path / "server.log", "compressibility", *args) as server:
        trusted = grpc.ssl_channel_credentials(
            read(pki["ca"]), read(pki["client_key"]), read(pki["client_cert"])
        )
        untrusted = grpc.ssl_channel_credentials(
            read(pki["ca"]), read(pki["rogue_key"]), read(pki["rogue_cert"])
        )
        no_cert = grpc.ssl_channel_credentials(read(pki["ca"]))
        assert score(server.endpoint, trusted) == grpc.StatusCode.OK
        assert score(server.endpoint, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert score(server.endpoint, untrusted) == grpc.StatusCode.UNAVAILABLE
        assert score(server.endpoint, no_cert) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.endpoint) as channel:  # plaintext health probes are refused too
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.poll() is None


# -- nothing secret in metrics, health, reflection or logs -----------------------------------------


def test_metrics_health_reflection_and_logs_expose_no_tokens_prompts_or_addresses(tmp_path: Path) -> None:
    secret_prompt = "prompt-secret-7f3a: a private product shot"
    secret_group = "group-secret-91c2"
    secret_meta = '{"note": "metadata-secret-55e1"}'
    wrong_token = "wrong-token-secret-0123456789abcdef"
    declared = "declared-client-secret-d00d"
    args = ["--token-file", str(_token_file(tmp_path / "tokens")), "--metrics-port", "0"]
    args += ["--quota-images-per-s", "5", "--quota-burst-s", "1"]
    with server_process(tmp_path / "server.log", "compressibility", *args) as server:
        with grpc.insecure_channel(server.endpoint) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            raw = channel.unary_unary(SCORE)
            ok = _request(secret_prompt, group_id=secret_group, metadata_json=secret_meta)
            broken = _request(secret_prompt, metadata_json="{broken " + secret_group)
            big = reward_pb2.ScoreRequest(samples=list(ok.samples) * 8)  # over team-a's 5 images/s
            attempts = [
                (stub.Score, ok, (*_bearer(TOKEN_A), ("x-e2po-client", declared))),
                (stub.Score, ok, _bearer(TOKEN_C)),
                (stub.Score, ok, _bearer(wrong_token)),
                (stub.Score, ok, _bearer(TOKEN_B)),
                (stub.Score, broken, _bearer(TOKEN_A)),
                (stub.Score, big, _bearer(TOKEN_A)),
                (raw, ok.SerializeToString()[:-3], _bearer(TOKEN_A)),
            ]
            codes = set()
            for method, request, metadata in attempts * 2:
                try:
                    method(request, metadata=metadata, timeout=10)
                    codes.add("OK")
                except grpc.RpcError as err:
                    codes.add(err.code().name)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            services = _reflection_services(channel)
        url = f"http://{server.metrics_endpoint}/metrics"
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        log = server.stderr()
    assert {"OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= codes
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    exposed = "\n".join([metrics, log, str(health), " ".join(services)])
    secrets = (
        TOKEN_A,
        TOKEN_B,
        TOKEN_C,
        wrong_token,
        secret_prompt,
        secret_group,
        "metadata-secret",
        declared,
    )
    for secret in secrets:
        assert secret not in exposed, secret
    assert "127.0.0.1:" not in metrics and "ipv4:" not in metrics  # no peer addresses as labels
    assert 'client="team-a"' in metrics  # the client *name* is what identifies a team


def _reflection_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return [s.name for r in responses for s in r.list_services_response.service]


def test_open_server_metrics_stay_bounded_with_many_declared_clients() -> None:
    """Without auth, queues are keyed by self-declared names or addresses: never metric labels."""

    async def main() -> str:
        async with running_server(MeanPixelScorer(), ServerConfig(port=0, metrics_port=0)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                await asyncio.gather(
                    *(
                        stub.Score(_request(), metadata=(("x-e2po-client", f"who-{i}"),), timeout=30)
                        for i in range(200)
                    )
                )
                await stub.Score(_request(), timeout=30)  # no declared name: keyed by peer address
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    text = run(main())
    queue_series = [line for line in text.splitlines() if line.startswith("reward_queue_images{")]
    assert queue_series == ['reward_queue_images{client="anonymous",model="meanpixel"} 0.0']
    assert "who-" not in text and "ipv4:" not in text


# -- no unsafe deserialisation in product code ------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "cloudpickle", "joblib"}


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe deserialisation or code-evaluation in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    found.append((node.lineno, f"import {name}"))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append((node.lineno, f"{name}()"))
        elif name == "load" and owner == "yaml":
            found.append((node.lineno, "yaml.load (use yaml.safe_load)"))
        elif name in ("unsafe_load", "full_load") and owner == "yaml":
            found.append((node.lineno, f"yaml.{name}"))
        elif name == "load" and owner == "torch":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "load" and owner in ("np", "numpy"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append((node.lineno, "numpy.load with allow_pickle"))
        elif name == "read_pickle":
            found.append((node.lineno, "read_pickle"))
    return found


def test_the_scan_finds_what_it_should() -> None:
    bad = (
        "import pickle\nfrom dill import loads\nimport yaml, torch, numpy as np\n"
        "eval('1')\nexec('x=1')\nyaml.load(s)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
    )
    assert len(unsafe_calls(bad)) == 8
    good = (
        "import yaml, torch\nmodel.eval()\nyaml.safe_load(s)\n"
        "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\njson.loads(s)\n"
    )
    assert unsafe_calls(good) == []


def test_no_pickle_eval_or_unsafe_yaml_in_product_code() -> None:
    offenders = []
    for directory in PRODUCT_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated by protoc from protos/reward.proto
            for line, what in unsafe_calls(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert offenders == [], "unsafe deserialisation or evaluation:\n" + "\n".join(offenders)
