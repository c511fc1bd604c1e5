# syntax=docker/dockerfile:1
# The weaved image: the daemon (`weaved run`) and, for the DaemonSet's init container, the static CNI plugin
# that `weaved cni-install` copies to the host. Build: `docker build -t weaved:0.1.0 .` (see docs/kubernetes.md).
#
# Stages: `cni` compiles the plugin (static, so it runs on any host libc), `wheels` builds weaved and its
# pinned dependencies (docker/requirements.txt) into wheels, and the final stage installs them on a slim
# Python with nft (the data path's masquerading rules). Base images are pinned by tag; pin them by digest
# too (`python:3.11.11-slim-bookworm@sha256:...`) when your registry policy asks for it.

ARG DEBIAN_IMAGE=debian:bookworm-20241111-slim
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${DEBIAN_IMAGE} AS cni
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY cni/weave-net.c cni/weave-net.c
# The smoke test runs the static binary the way a runtime first does (VERSION is answered locally).
RUN gcc -static -Os -Wall -Wextra -o weave-net cni/weave-net.c \
 && strip weave-net \
 && echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION ./weave-net | grep -q supportedVersions

FROM ${PYTHON_IMAGE} AS wheels
# gcc builds the sleeve's C hot loop into the weaved wheel (setup.py), sealing frames with libgcrypt (AES-256-GCM)
# and OpenSSL's libcrypto as its fallback; the final stage needs no compiler, only those two libraries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev libgcrypt20-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY docker/requirements.txt docker/requirements.txt
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels -r docker/requirements.txt
COPY pyproject.toml setup.py README.md ./
COPY weaved weaved
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="weaved" \
      org.opencontainers.image.description="A Weave-Net-like overlay network for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables libssl3 libgcrypt20 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && python -c "import weaved.adapters.daemon, weaved.k8s.agent; from weaved.adapters import _sleevepump"
COPY --from=cni /src/weave-net /usr/local/lib/weaved/weave-net
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 6783/udp 6782/tcp
ENTRYPOINT []
CMD ["weaved", "run"]
