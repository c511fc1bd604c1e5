"""The lab's pure planning: names, addresses, state, partition rules and the convergence check.

No root needed: these pin down what ``weaved lab`` decides; ``tests/netns`` checks that it is carried out.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.core.status import ConnectionStatus, MeshStatus, PeerStatus
from weaved.lab import cli, host, ops
from weaved.lab.plan import (
    MAX_LAB_NAME,
    MAX_NODES,
    LabError,
    LabState,
    blocked_pairs,
    convergence_gaps,
    daemon_argv,
    describe_partition,
    expected_views,
    heal_ruleset,
    is_lab_netns,
    node_address,
    node_index,
    node_names,
    node_netns,
    parse_groups,
    partition_ruleset,
    plan_lab,
    process_state,
    reachable_nicknames,
    switch_netns,
    validate_lab_name,
    validate_node_count,
)

IFNAMSIZ = 16

# --- names and addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lab", "a", "t12345", "x-1", "abcdefgh"])
def test_valid_lab_names(name: str) -> None:
    assert validate_lab_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "a_b", "-a", "a-", "abcdefghi", "a b", "a/b", "..", "ä"])
def test_invalid_lab_names_are_refused_with_a_hint(name: str) -> None:
    with pytest.raises(LabError, match="a-z, 0-9"):
        validate_lab_name(name)


@given(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True))
def test_every_valid_lab_name_keeps_namespace_names_within_ifnamsiz(name: str) -> None:
    validate_lab_name(name)
    assert len(name) <= MAX_LAB_NAME
    names = [switch_netns(name), *(node_netns(name, n) for n in node_names(MAX_NODES))]
    assert max(len(n) for n in names) < IFNAMSIZ


def test_node_count_bounds() -> None:
    assert validate_node_count(1) == 1
    assert validate_node_count(MAX_NODES) == MAX_NODES
    for bad in (0, -1, MAX_NODES + 1):
        with pytest.raises(LabError, match="node count"):
            validate_node_count(bad)


def test_addresses_are_test_net_2_offset_by_ten() -> None:
    assert str(node_address("n1")) == "198.51.100.11/24"
    assert str(node_address("n3")) == "198.51.100.13/24"
    assert str(node_address(f"n{MAX_NODES}")).startswith("198.51.100.")


@pytest.mark.parametrize("bad", ["n0", "n", "1", "node1", "n01", "N1", "n1 "])
def test_node_index_refuses_other_names(bad: str) -> None:
    with pytest.raises(LabError, match="invalid node name"):
        node_index(bad)


def test_is_lab_netns_matches_only_this_labs_scheme() -> None:
    assert is_lab_netns("a", "wl-a-sw")
    assert is_lab_netns("a", "wl-a-n1")
    assert is_lab_netns("a", "wl-a-n64")
    # another lab whose name starts the same, or anything else, is never ours
    assert not is_lab_netns("a", "wl-a-b-sw")
    assert not is_lab_netns("a", "wl-a-b-n1")
    assert not is_lab_netns("a-b", "wl-a-sw")
    assert not is_lab_netns("a", "wl-ab-n1")
    assert not is_lab_netns("a", "wl-a-n0")
    assert not is_lab_netns("a", "wl-a-n1x")
    assert not is_lab_netns("a", "wl-a-")
    assert not is_lab_netns("a", "a-n1")


def test_pod_namespaces_belong_to_their_lab_only() -> None:
    assert is_lab_netns("a", "wl-a-n1-p1")
    assert is_lab_netns("a", "wl-a-n12-web")
    # lab "a-n1"'s switch and nodes are not lab "a"'s pods, nor are lab "a-n1"'s pods
    assert not is_lab_netns("a", "wl-a-n1-sw")
    assert not is_lab_netns("a", "wl-a-n1-n2")
    assert not is_lab_netns("a", "wl-a-n1-n2-web")
    assert is_lab_netns("a-n1", "wl-a-n1-n2-web")


# --- plan and state ------------------------------------------------------------------------------------


def test_plan_lab_lays_out_nodes(tmp_path: Path) -> None:
    state = plan_lab("x", 3, "/venv/bin/python", tmp_path)
    assert state.switch_netns == "wl-x-sw"
    assert state.node_names == ["n1", "n2", "n3"]
    n2 = state.node("n2")
    assert n2.netns == "wl-x-n2"
    assert n2.address == "198.51.100.12/24"
    assert n2.ip == "198.51.100.12"
    assert n2.state_dir == str(tmp_path / "x" / "n2" / "state")
    assert n2.log_path == str(tmp_path / "x" / "n2" / "weaved.log")
    assert n2.pid is None
    assert state.partition is None


def test_unknown_node_lists_the_nodes() -> None:
    state = plan_lab("x", 2, "py")
    with pytest.raises(LabError, match=r"no node 'n5' .*n1, n2"):
        state.node("n5")
    with pytest.raises(LabError, match="invalid node name"):
        state.node("foo")


def test_state_round_trips_through_json() -> None:
    state = plan_lab("x", 2, "py")
    state = replace(state.with_node(replace(state.nodes[0], pid=42, starttime=7)), partition=[["n1"], ["n2"]])
    assert LabState.from_json(state.to_json()) == state


def test_state_of_another_version_is_refused() -> None:
    data = plan_lab("x", 1, "py").to_json()
    data["version"] = 99
    with pytest.raises(LabError, match="version"):
        LabState.from_json(data)


def test_daemon_argv_lists_every_other_node_as_peer() -> None:
    state = plan_lab("x", 3, "/venv/bin/python")
    argv = daemon_argv(state, "n2")
    assert argv[:4] == ["/venv/bin/python", "-m", "weaved", "run"]
    assert argv[argv.index("--nickname") + 1] == "n2"
    assert argv[argv.index("--state-dir") + 1] == state.node("n2").state_dir
    assert argv[argv.index("--port") + 1] == "6783"
    assert argv[argv.index("--log-format") + 1] == "console"
    peers = [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"]
    assert peers == ["198.51.100.11", "198.51.100.13"]
    # the nodes share one filesystem: each daemon its own control socket, which `lab exec` points the CLI at
    assert argv[argv.index("--api-socket") + 1] == state.node("n2").api_socket == state.node("n2").state_dir + \
        "/weaved.sock"
    assert len({state.node(n).api_socket for n in ("n1", "n2", "n3")}) == 3


def test_process_state() -> None:
    assert process_state(None, False) == "stopped"
    assert process_state(12, True) == "running"
    assert process_state(12, False) == "dead"


# --- partitions ----------------------------------------------------------------------------------------

NODES = ["n1", "n2", "n3", "n4"]


def test_parse_groups_keeps_given_groups() -> None:
    assert parse_groups(["n1", "n3,n2"], NODES) == [["n1"], ["n2", "n3"]]


def test_a_single_group_is_cut_off_from_all_others() -> None:
    assert parse_groups(["n2"], NODES) == [["n2"], ["n1", "n3", "n4"]]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "at least one group"),
        (["n1", ","], "empty partition group"),
        (["n1", "n1,n2"], "more than one"),
        (["n1", "n9"], "unknown node 'n9'"),
        (["n1", "x"], "invalid node name"),
        (["n1,n2,n3,n4"], "leave some nodes out"),
    ],
)
def test_parse_groups_refuses(args: list[str], error: str) -> None:
    with pytest.raises(LabError, match=error):
        parse_groups(args, NODES)


def test_blocked_pairs_are_between_groups_only() -> None:
    blocked = blocked_pairs([["n1"], ["n2", "n3"]])
    assert blocked == {frozenset(("n1", "n2")), frozenset(("n1", "n3"))}
    assert blocked_pairs([]) == set()


def test_partition_ruleset_drops_between_groups_and_replaces_the_previous_one() -> None:
    script = partition_ruleset([["n1"], ["n2", "n3"]])
    lines = script.splitlines()
    # declare + delete first: one transaction that replaces whatever partition was there
    assert lines[:2] == heal_ruleset().splitlines()
    assert "table bridge weaved_lab {" in lines
    assert "type filter hook forward priority 0; policy accept;" in script
    assert 'iifname { "n1" } oifname { "n2", "n3" } counter drop' in script
    assert 'iifname { "n2", "n3" } oifname { "n1" } counter drop' in script
    assert script.count(" drop") == 2


def test_partition_ruleset_with_three_groups_leaves_ungrouped_ports_alone() -> None:
    script = partition_ruleset([["n1"], ["n2"], ["n3"]])
    assert 'iifname { "n1" } oifname { "n2", "n3" }' in script
    assert 'iifname { "n2" } oifname { "n1", "n3" }' in script
    assert 'iifname { "n3" } oifname { "n1", "n2" }' in script
    assert '"n4"' not in script


def test_heal_ruleset_is_idempotent_declare_then_delete() -> None:
    assert heal_ruleset() == "table bridge weaved_lab\ndelete table bridge weaved_lab\n"


def test_describe_partition() -> None:
    assert describe_partition(None) == "none"
    assert describe_partition([["n1"], ["n2", "n3"]]) == "n1 | n2,n3"


def test_expected_views_without_partition_is_everyone_running() -> None:
    assert expected_views(["n1", "n2", "n3"], None) == {"n1": {"n2", "n3"}, "n2": {"n1", "n3"}, "n3": {"n1", "n2"}}


def test_expected_views_split_by_partition() -> None:
    views = expected_views(["n1", "n2", "n3"], [["n1"], ["n2", "n3"]])
    assert views == {"n1": set(), "n2": {"n3"}, "n3": {"n2"}}


def test_expected_views_relay_through_an_ungrouped_node() -> None:
    views = expected_views(["n1", "n2", "n3"], [["n1"], ["n2"]])
    assert views["n1"] == {"n2", "n3"}
    # …unless that node is not running
    assert expected_views(["n1", "n2"], [["n1"], ["n2"]]) == {"n1": set(), "n2": set()}


# --- convergence ---------------------------------------------------------------------------------------


def report(me: str, reach: dict[str, bool]) -> dict[str, Any]:
    """A report shaped exactly like the daemon's (MeshStatus.to_json)."""

    def peer(nick: str, next_hop: str | None) -> PeerStatus:
        return PeerStatus(
            name=f"name-{nick}", nickname=nick, uid=1, version=1, short_id=1, connections=[], next_hop=next_hop
        )

    peers = [peer(me, None)] + [peer(n, f"name-{n}" if up else None) for n, up in reach.items()]
    conns = [ConnectionStatus(f"198.51.100.{10 + node_index(n)}:6783", True, "established", None, n, "") for n in reach]
    status = MeshStatus(
        name=f"name-{me}",
        nickname=me,
        uid=1,
        short_id=1,
        protocol="weave",
        port=6783,
        conn_limit=100,
        peers=peers,
        connections=conns,
        targets=[],
    )
    return status.to_json()


def test_reachable_nicknames_excludes_self_and_unreachable() -> None:
    assert reachable_nicknames(report("n1", {"n2": True, "n3": False})) == {"n2"}


def test_converged_mesh_has_no_gaps() -> None:
    reports = {
        "n1": report("n1", {"n2": True, "n3": True}),
        "n2": report("n2", {"n1": True, "n3": True}),
        "n3": report("n3", {"n1": True, "n2": True}),
    }
    assert convergence_gaps(reports, expected_views(reports, None)) == {}


def test_gaps_name_missing_peers_and_silent_nodes() -> None:
    reports = {"n1": report("n1", {"n2": True}), "n2": None}
    gaps = convergence_gaps(reports, expected_views(["n1", "n2", "n3"], None))
    assert gaps == {
        "n1": "does not reach n3",
        "n2": "no report (daemon not answering)",
        "n3": "no report (daemon not answering)",
    }


def test_a_killed_node_must_be_gone_absent_or_without_next_hop() -> None:
    expected = expected_views(["n1", "n2"], None)
    still_there = {"n1": report("n1", {"n2": True, "n3": True}), "n2": report("n2", {"n1": True})}
    assert convergence_gaps(still_there, expected) == {"n1": "still reaches n3"}
    gone = {"n1": report("n1", {"n2": True, "n3": False}), "n2": report("n2", {"n1": True})}
    assert convergence_gaps(gone, expected) == {}


def test_a_report_from_the_wrong_node_is_a_gap() -> None:
    gaps = convergence_gaps({"n1": report("n2", {})}, {"n1": set()})
    assert gaps == {"n1": "report is from nickname 'n2'"}


# --- thin I/O helpers that need no root ----------------------------------------------------------------


def test_missing_tool_is_one_line_that_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(host, "_SBIN", ())
    with pytest.raises(LabError) as info:
        host.find_tool("nft")
    assert str(info.value) == "nft not found: install nftables (apt-get install -y nftables)"
    with pytest.raises(LabError, match=r"ip not found: install iproute2 \(apt-get install -y iproute2\)"):
        host.find_tool("ip")


def test_proc_stat_and_identity_of_this_process() -> None:
    stat = host.proc_stat(os.getpid())
    assert stat is not None
    assert stat[0] in "RS"
    assert host.is_our_process(os.getpid(), "python", stat[1])
    assert not host.is_our_process(os.getpid(), "python", stat[1] + 1)
    assert not host.is_our_process(os.getpid(), "no-such-marker-in-cmdline", None)


def test_tool_env_puts_the_venv_first() -> None:
    path = host.tool_env()["PATH"].split(os.pathsep)
    assert path[0] == os.path.dirname(sys.executable)
    assert "/usr/sbin" in path


# --- CLI parsing ---------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weaved")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["lab", *argv])


def test_every_subcommand_has_a_func_and_a_name() -> None:
    for argv in (
        ["up", "--nodes", "3"],
        ["down"],
        ["status", "--json"],
        ["exec", "n1", "--", "true"],
        ["logs", "n1", "-f"],
        ["kill", "n1"],
        ["start", "n1"],
        ["partition", "n1", "n2,n3"],
        ["heal"],
        ["wait"],
    ):
        args = parse(argv[0], "--name", "x", *argv[1:])
        assert callable(args.func)
        assert args.name == "x"
    assert parse("down").name == "lab"


def test_exec_keeps_the_command_and_its_options() -> None:
    args = parse("exec", "n1", "--", "weaved", "status", "--name", "peers")
    assert args.node == "n1"
    assert [a for a in args.cmd if a != "--"] == ["weaved", "status", "--name", "peers"]
    assert args.name == "lab"


def test_lab_errors_become_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    rc = parse("status", "--name", "Bad_Name").func(parse("status", "--name", "Bad_Name"))
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("weaved lab: error: invalid lab name 'Bad_Name'")


def test_tool_env_drops_settings_that_would_bend_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBE_PEERS", "192.0.2.1")
    monkeypatch.setenv("WEAVE_HTTP_ADDR", "127.0.0.1:9999")
    monkeypatch.setenv("WEAVE_API_SOCKET", "/run/weave/weaved.sock")
    monkeypatch.setenv("WEAVE_LOG_LEVEL", "debug")
    env = host.tool_env()
    assert "KUBE_PEERS" not in env
    assert "WEAVE_HTTP_ADDR" not in env
    assert "WEAVE_API_SOCKET" not in env, "the host's daemon is not the node's"
    state = plan_lab("x", 2, "/venv/bin/python")
    assert ops.exec_env(state, state.node("n2"))["WEAVE_API_SOCKET"] == state.node("n2").api_socket
    assert env["WEAVE_LOG_LEVEL"] == "debug"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_a_lab_password_reaches_every_daemon_as_a_file_never_the_password_itself() -> None:
    state = plan_lab("t", 3, "/venv/bin/python", Path("/run/x"), password_file="/secrets/pw")
    argv = daemon_argv(state, "n2")
    assert argv[argv.index("--password-file") + 1] == "/secrets/pw"
    bare = daemon_argv(plan_lab("t", 3, "/venv/bin/python", Path("/run/x")), "n2")
    assert "--password-file" not in bare


def test_nodes_whose_passwords_differ_are_expected_apart() -> None:
    passwords = {"n1": "a", "n2": "a", "n3": None, "n4": "b"}
    assert expected_views(["n1", "n2", "n3", "n4"], None, passwords) == {
        "n1": {"n2"}, "n2": {"n1"}, "n3": set(), "n4": set()}
    # With a partition as well: n1 and n2 share a password but not the underlay.
    assert expected_views(["n1", "n2"], [["n1"], ["n2"]], {"n1": "a", "n2": "a"}) == {"n1": set(), "n2": set()}
