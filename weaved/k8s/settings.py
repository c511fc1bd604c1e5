"""When and how weaved talks to Kubernetes: a pure function of the flags and the environment.

Kept free of aiohttp so that :mod:`weaved.config` (imported by every CLI command) stays light.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

NAMESPACE = "kube-system"
"""Where the DaemonSet and the reclaim ConfigMap live (``daemonset/weaved.yaml``)."""
RECLAIM_CONFIGMAP = "weaved"
"""The ConfigMap that arbitrates reclaim (:mod:`weaved.core.kube.registry`)."""
NODE_NAME_ENV = "HOSTNAME"
"""The Node's name, set from ``spec.nodeName`` in the manifest (Weave Net's variable)."""
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
"""Set by the kubelet in every pod: its presence means "running in a cluster"."""

API_ENV = "WEAVED_KUBE_API"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class KubeSettingError(ValueError):
    """A Kubernetes setting is wrong; ``str()`` is one line."""


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """Node discovery and reclaim through the API server, on when running in a cluster or with ``--kube``."""

    node_name: str
    api_server: str | None = None
    """``WEAVED_KUBE_API``: talk to this URL without credentials (``kubectl proxy``, tests) instead of the
    in-cluster service account."""
    namespace: str = NAMESPACE
    configmap: str = RECLAIM_CONFIGMAP


def parse_kube_settings(flag: bool | None, env: Mapping[str, str], hostname: str) -> KubeSettings | None:
    """``flag`` is ``--kube`` (True), ``--no-kube`` (False) or neither (None: on inside a cluster)."""
    enabled = flag if flag is not None else bool(env.get(IN_CLUSTER_ENV, "").strip())
    if not enabled:
        return None
    node = (env.get(NODE_NAME_ENV, "").strip() or hostname.strip()).lower()
    if len(node) > 253 or not _DNS_SUBDOMAIN.match(node):
        raise KubeSettingError(f"--kube: the node name {node!r} (from {NODE_NAME_ENV}, else the host name) "
                               "is not a valid Kubernetes node name")
    api = env.get(API_ENV, "").strip() or None
    if api is not None and not api.startswith(("http://", "https://")):
        raise KubeSettingError(f"{API_ENV}: {api!r} is not an http:// or https:// URL")
    return KubeSettings(node_name=node, api_server=api.rstrip("/") if api else None)
