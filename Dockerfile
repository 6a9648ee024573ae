# syntax=docker/dockerfile:1.7
# One image for every E2PO process: any reward server, the trainer (plain or under torchrun), the
# client CLI; the `torchserve` target adds Java for the TorchServe adapter. docs/deploy.md has the
# build commands. Final stages hold no compiler and run as uid 10001 with a read-only root filesystem
# in mind: everything written at run time goes to /tmp, /cache or a mounted volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Debian packages at exact bookworm versions (checked against the bookworm mirror on 2026-12-06). A
# security update retires the old version from the mirror: pass the new one as a build argument (the
# candidate `apt-cache policy PACKAGE` prints on bookworm) and update it here.
ARG BUILD_ESSENTIAL_VERSION=12.9
ARG OPENJDK_17_VERSION=17.0.19+10-1~deb12u2

# -- builder: resolves and installs the dependencies (compilers only here, for any sdist) ------------
FROM ${PYTHON_IMAGE} AS builder
ARG BUILD_ESSENTIAL_VERSION
RUN apt-get update \
    && apt-get install -y --no-install-recommends "build-essential=${BUILD_ESSENTIAL_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Extras of pyproject.toml to install: `models` for every scorer and the trainer; add `torchserve`
# for the torchserve target. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu makes a smaller
# CPU-only image (dev clusters) with the same torch version.
ARG E2PO_EXTRAS=models
ARG TORCH_INDEX_URL=""
COPY pyproject.toml constraints.txt ./
# The declared requirements only (the project runs from /app), so this layer survives source edits.
RUN python - <<'EOF' > /tmp/requirements.txt
import os
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
for extra in filter(None, os.environ["E2PO_EXTRAS"].split(",")):
    requirements += [r for r in project["optional-dependencies"][extra] if not r.startswith("e2po[")]
print("\n".join(requirements))
EOF

# constraints.txt holds the exact versions `make` installs, so the image and a venv agree.
# ultralytics pulls opencv-python, whose cv2 needs libGL and glib, which the slim runtime lacks (the prod
# GenEval detector would fail to import). The headless build of the same version provides the same cv2.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt -r /tmp/requirements.txt \
    && if pip show opencv-python >/dev/null 2>&1; then \
        version="$(python -c 'import importlib.metadata as m; print(m.version("opencv-python"))')" \
        && pip uninstall -y opencv-python \
        && pip install --no-deps "opencv-python-headless==$version"; \
    fi
COPY protos protos
COPY services services
COPY shapes shapes
COPY trainer trainer
# Bytecode now: at run time the root filesystem is read-only and PYTHONDONTWRITEBYTECODE is set.
RUN python -m compileall -q /src

# -- app: what every final stage shares -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS app
RUN groupadd --system --gid 10001 e2po \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin e2po \
    && mkdir -p /cache && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src /app
# MODE [ARGS...]; `serve` appends $E2PO_FLAGS_DIR/<scorer>.args (one flag per line, '#' comments) so
# Kubernetes can keep per-scorer flags in a ConfigMap. Everything is exec'd: signals reach Python.
COPY --chmod=0755 <<'EOF' /usr/local/bin/e2po-entrypoint
#!/bin/sh
set -eu
usage() {
    echo "usage: e2po-entrypoint serve SCORER [FLAGS...] | train [FLAGS...] | torchrun [FLAGS...]" >&2
    echo "                       | client [ARGS...] | torchserve [ARGS...]" >&2
}
[ $# -ge 1 ] || { usage; exit 64; }
mode=$1
shift
case "$mode" in
    serve)
        [ $# -ge 1 ] || { usage; exit 64; }
        if [ -n "${E2PO_FLAGS_DIR:-}" ]; then
            flags="$E2PO_FLAGS_DIR/$1.args"
            [ -f "$flags" ] || { echo "e2po-entrypoint: $flags is missing" >&2; exit 64; }
            while IFS= read -r line || [ -n "$line" ]; do
                case "$line" in ''|'#'*) continue ;; esac
                set -- "$@" "$line"
            done < "$flags"
        fi
        exec python -m services.serve "$@" ;;
    train) exec python -m trainer.run "$@" ;;
    # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-* from PET_* variables, which
    # Kubeflow Trainer (or the indexed-Job manifest) sets.
    torchrun) exec torchrun --module trainer.run "$@" ;;
    client) exec python -m services.client "$@" ;;
    torchserve) exec torchserve --foreground --ncs "$@" ;;
    -h|--help|help) usage ;;
    *) usage; exit 64 ;;
esac
EOF

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/cache/matplotlib \
    YOLO_CONFIG_DIR=/cache/ultralytics \
    YOLO_OFFLINE=1
WORKDIR /app
# Every scorer's modules import in the runtime image itself (no libGL here): a missing system library
# fails the build, not a pod at start.
# (Only where the scorers' libraries are installed: the `models` extra.)
RUN python -c "import importlib.util as u, services.registry as r; u.find_spec('ultralytics') and r.import_all()"
USER 10001:10001
EXPOSE 50051 9464
ENTRYPOINT ["e2po-entrypoint"]
CMD ["--help"]

# -- torchserve: app plus a Java runtime (build with E2PO_EXTRAS=models,torchserve) ------------------
FROM app AS torchserve
ARG OPENJDK_17_VERSION
USER 0
RUN apt-get update \
    && apt-get install -y --no-install-recommends "openjdk-17-jre-headless=${OPENJDK_17_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
RUN python -c "import ts, model_archiver" \
    || { echo "build with --build-arg E2PO_EXTRAS=models,torchserve" >&2; exit 1; }
# TorchServe writes key_file.json and logs to its working directory.
WORKDIR /tmp
EXPOSE 8080 7070 8082

# -- runtime: the default target (last, so a plain `docker build .` produces it) ---------------------
FROM app AS runtime
