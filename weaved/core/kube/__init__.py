"""Pure decision logic for running in a Kubernetes cluster: Node objects → peer set changes (:mod:`.nodes`),
and the reclaim registry kept in a ConfigMap (:mod:`.registry`). The HTTP lives in :mod:`weaved.k8s`."""
