"""Node objects → peer addresses, and what a list or an event changed."""

from __future__ import annotations

from typing import Any

from weaved.core.kube.nodes import NodeChanges, NodeInfo, NodeView, node_address, node_info


def node(name: str, *addresses: tuple[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


def test_internal_ip_wins_then_external_and_ipv6_is_skipped() -> None:
    assert node_address(node("n", ("ExternalIP", "203.0.113.1"), ("InternalIP", "198.51.100.1"))) == "198.51.100.1"
    assert node_address(node("n", ("InternalIP", "fd00::1"), ("ExternalIP", "203.0.113.1"))) == "203.0.113.1"
    assert node_address(node("n", ("Hostname", "n"), ("InternalIP", "garbage"))) is None
    assert node_address({"metadata": {"name": "n"}}) is None
    assert node_info({"metadata": {}}) is None and node_info("x") is None
    assert node_info(node("n")) == NodeInfo("n", None)


def test_replace_reports_added_removed_and_deleted_but_never_ourselves() -> None:
    view = NodeView("me")
    first = view.replace([node("me", ("InternalIP", "198.51.100.1")), node("n2", ("InternalIP", "198.51.100.2")),
                          {"bad": 1}])
    assert first == NodeChanges(added={"198.51.100.2"}, malformed=1)
    second = view.replace([node("me", ("InternalIP", "198.51.100.1")), node("n3", ("InternalIP", "198.51.100.3"))])
    assert second == NodeChanges(added={"198.51.100.3"}, removed={"198.51.100.2"}, deleted={"n2"})
    assert view.names() == {"me", "n3"}


def test_events_change_the_view() -> None:
    view = NodeView("me")
    assert view.apply("ADDED", node("n2")) == NodeChanges()  # no address yet
    assert view.apply("MODIFIED", node("n2", ("InternalIP", "198.51.100.2"))) == NodeChanges(added={"198.51.100.2"})
    assert view.apply("MODIFIED", node("n2", ("InternalIP", "198.51.100.9"))) == NodeChanges(
        added={"198.51.100.9"}, removed={"198.51.100.2"})
    assert view.apply("DELETED", node("n2")) == NodeChanges(removed={"198.51.100.9"}, deleted={"n2"})
    assert view.apply("DELETED", node("me")) == NodeChanges(), "our own Node is never a reclaim candidate"
    assert view.apply("BOOKMARK", node("x")) == NodeChanges()
    assert view.apply("ADDED", {"metadata": {}}) == NodeChanges(malformed=1)
