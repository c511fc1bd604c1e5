"""weaved's CNI plugin: the pure protocol (:mod:`.spec`, :mod:`.wire`), the daemon's socket server
(:mod:`.server`), what each command does (:mod:`.handler`), the pod interface (:mod:`.links`,
:mod:`.nsenter`), delegated IPAM (:mod:`.delegate`) and the conflist (:mod:`.conflist`).
The binary runtimes execute is the C forwarder ``cni/weave-net.c``; see docs/cni.md."""
