"""The lab's pod planning: names, the CNI chain as libcni runs it, the reachability matrix."""

from __future__ import annotations

import pytest

from weaved.lab.plan import LabError
from weaved.lab.pods import (
    PodRecord,
    Target,
    chain_configs,
    cni_env,
    matrix_targets,
    plan_pod,
    render_matrix,
    result_address,
    validate_pod_name,
    with_prev_result,
)

CONFLIST = {"cniVersion": "1.0.0", "name": "weave", "plugins": [
    {"type": "weave-net", "daemonSocket": "/run/x.sock"},
    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}


def test_pod_names_exclude_the_switch_and_node_names() -> None:
    assert validate_pod_name("web") == "web"
    for bad in ("sw", "n1", "n12", "", "Web", "a-b", "toolongname"):
        with pytest.raises(LabError):
            validate_pod_name(bad)
    pod = plan_pod("lab", "n2", "p1")
    assert (pod.netns, pod.container_id, pod.label) == ("wl-lab-n2-p1", "wl-lab-n2-p1", "n2/p1")


def test_chain_configs_carry_the_list_name_and_version_and_the_previous_result() -> None:
    first, second = chain_configs(CONFLIST)
    assert first == {"type": "weave-net", "daemonSocket": "/run/x.sock", "name": "weave", "cniVersion": "1.0.0"}
    assert second["type"] == "portmap" and second["name"] == "weave"
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.32.0.5/12"}]}
    assert with_prev_result(second, prev)["prevResult"] == prev
    assert "prevResult" not in with_prev_result(first, None)
    with pytest.raises(LabError, match="no plugins"):
        chain_configs({"cniVersion": "1.0.0", "name": "x", "plugins": []})
    with pytest.raises(LabError, match="without a type"):
        chain_configs({"cniVersion": "1.0.0", "name": "x", "plugins": [{"nope": 1}]})


def test_env_and_result_address() -> None:
    pod = plan_pod("lab", "n1", "p1")
    env = cni_env("DEL", pod, "", "/opt/cni/bin")
    assert env == {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "wl-lab-n1-p1", "CNI_NETNS": "",
                   "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    assert result_address({"ips": [{"address": "fd00::1/64"}, {"address": "10.32.0.5/12"}]}) == "10.32.0.5/12"
    with pytest.raises(LabError, match="no IPv4"):
        result_address({"ips": []})


def test_matrix_marks_each_unreached_pair_and_counts_them() -> None:
    a = PodRecord("p1", "n1", "wl-l-n1-p1", "c", "10.32.0.2/12")
    b = PodRecord("p1", "n2", "wl-l-n2-p1", "c", "10.40.0.2/12")
    targets = matrix_targets([b, a], {"n1": "10.32.0.1", "n2": "10.40.0.1"})
    assert [t.label for t in targets] == ["n1/p1", "n2/p1", "n1", "n2"]
    reached = {("n1/p1", t.label): True for t in targets} | {("n2/p1", "n1/p1"): True, ("n2/p1", "n1"): True}
    text = render_matrix([a, b], targets, reached)
    lines = text.splitlines()
    assert lines[1].split() == ["n1/p1", "·", "ok", "ok", "ok"]
    assert lines[2].split() == ["n2/p1", "ok", "·", "ok", "--"]
    assert lines[-1] == "5/6 reachable, 1 NOT reachable"
    assert render_matrix([a], [Target("n1", "10.32.0.1")], {("n1/p1", "n1"): True}).endswith("1/1 reachable")
