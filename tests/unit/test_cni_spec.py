"""The pure CNI layer: request validation, version negotiation, result rendering, GC input, names, framing."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weaved.cni import conflist, spec, wire
from weaved.cni.spec import Attachment, CniError, Route
from weaved.config import DEFAULT_CNI_SOCKET, ConfigError, parse_settings

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin"}


def conf(**extra: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "weave", "type": "weave-net", **extra}).encode()


def code(env: dict[str, str], stdin: bytes) -> int:
    with pytest.raises(CniError) as info:
        spec.parse_request(env, stdin)
    return info.value.code


def test_valid_add() -> None:
    request = spec.parse_request({**BASE_ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web"}, conf(mtu=1400))
    assert (request.command, request.container_id, request.ifname, request.conf.mtu) == ("ADD", "abc", "eth0", 1400)
    assert request.args == (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web"))
    assert request.path == ("/opt/cni/bin",) and request.conf.ipam is None and request.conf.hairpin


@pytest.mark.parametrize(("env", "stdin", "expected"), [
    ({k: v for k, v in BASE_ENV.items() if k != "CNI_COMMAND"}, conf(), 4),
    ({**BASE_ENV, "CNI_CONTAINERID": ""}, conf(), 4),
    ({**BASE_ENV, "CNI_CONTAINERID": "a/b"}, conf(), 4),
    ({**BASE_ENV, "CNI_CONTAINERID": "x" * 201}, conf(), 4),
    ({**BASE_ENV, "CNI_IFNAME": "eth 0"}, conf(), 4),
    ({**BASE_ENV, "CNI_IFNAME": ".."}, conf(), 4),
    ({**BASE_ENV, "CNI_NETNS": ""}, conf(), 4),
    ({**BASE_ENV, "CNI_ARGS": "a=1;b"}, conf(), 4),
    (BASE_ENV, b"", 6),
    (BASE_ENV, b"\xff", 6),
    (BASE_ENV, b'"text"', 6),
    (BASE_ENV, conf(cniVersion="0.1.0"), 1),
    (BASE_ENV, conf(cniVersion="1.2.0"), 1),
    (BASE_ENV, conf(cniVersion=""), 7),
    (BASE_ENV, conf(name=""), 7),
    (BASE_ENV, conf(mtu="1400"), 7),
    (BASE_ENV, conf(mtu=True), 7),
    (BASE_ENV, conf(hairpinMode="yes"), 7),
    (BASE_ENV, conf(ipam=[]), 7),
    (BASE_ENV, conf(ipam={"type": "../evil"}), 7),
    (BASE_ENV, conf(ipamTimeoutSeconds=0), 7),
    (BASE_ENV, conf(prevResult=[]), 7),
    ({**BASE_ENV, "CNI_COMMAND": "CHECK"}, conf(), 7),
    ({**BASE_ENV, "CNI_COMMAND": "CHECK"}, conf(cniVersion="0.3.1", prevResult={}), 1),
    ({"CNI_COMMAND": "STATUS"}, conf(), 1),
    ({"CNI_COMMAND": "GC"}, conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": 1}]}), 7),
    ({"CNI_COMMAND": "GC"}, conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": {}}), 7),
])
def test_error_codes(env: dict[str, str], stdin: bytes, expected: int) -> None:
    assert code(env, stdin) == expected


def test_del_without_netns_and_status_without_container() -> None:
    assert spec.parse_request({**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, conf()).netns == ""
    assert spec.parse_request({"CNI_COMMAND": "STATUS"}, conf(cniVersion="1.1.0")).container_id == ""


def test_gc_valid_attachments() -> None:
    valid = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    stdin = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid})
    request = spec.parse_request({"CNI_COMMAND": "GC"}, stdin)
    assert request.conf.valid_attachments == (("a", "eth0"), ("b", "net1"))
    assert spec.parse_request({"CNI_COMMAND": "GC"}, conf(cniVersion="1.1.0")).conf.valid_attachments == ()


def test_empty_ipam_means_daemon_ipam() -> None:
    assert spec.parse_request(BASE_ENV, conf(ipam={})).conf.ipam is None
    assert spec.parse_request(BASE_ENV, conf(ipam={"type": "host-local"})).conf.ipam == {"type": "host-local"}


@given(st.dictionaries(st.sampled_from([*wire.FORWARDED, "OTHER"]), st.text(max_size=30)), st.binary(max_size=200))
def test_parse_request_only_raises_cni_errors(env: dict[str, str], stdin: bytes) -> None:
    try:
        spec.parse_request(env, stdin)
    except CniError as exc:
        assert 1 <= exc.code <= 199 and exc.msg


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=10)


@given(st.dictionaries(st.sampled_from(["cniVersion", "name", "mtu", "ipam", "hairpinMode", "prevResult",
                                        "ipamTimeoutSeconds", "dns", "cni.dev/valid-attachments"]),
                       json_values), st.sampled_from(spec.COMMANDS))
def test_parse_conf_fuzz(doc: dict[str, Any], command: str) -> None:
    env = {**BASE_ENV, "CNI_COMMAND": command}
    try:
        spec.parse_request(env, json.dumps(doc).encode())
    except CniError as exc:
        assert exc.code in (1, 4, 6, 7)


def attachment(mtu: int = 1376) -> Attachment:
    return Attachment("vethwe123456789", "aa:bb:cc:dd:ee:ff", "eth0", "11:22:33:44:55:66", "/run/netns/p",
                      IPv4Interface("10.32.0.5/12"), IPv4Address("10.32.0.1"), mtu,
                      (Route(IPv4Network("0.0.0.0/0"), IPv4Address("10.32.0.1")),))


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_render_then_parse(version: str) -> None:
    doc = spec.render_result(version, attachment())
    assert doc["cniVersion"] == version
    assert ("version" in doc["ips"][0]) == (version < "1.0.0")
    assert ("mtu" in doc["interfaces"][1]) == (version >= "1.1.0")
    assert doc["interfaces"][doc["ips"][0]["interface"]]["sandbox"] == "/run/netns/p"
    parsed = spec.parse_result(json.loads(json.dumps(doc)))
    assert parsed.addresses == ((IPv4Interface("10.32.0.5/12"), IPv4Address("10.32.0.1"), "eth0"),)
    assert parsed.routes == (Route(IPv4Network("0.0.0.0/0"), IPv4Address("10.32.0.1")),)


def test_parse_result_skips_ipv6_and_reports_errors() -> None:
    doc = {"cniVersion": "1.0.0", "ips": [{"address": "fd00::2/64"}, {"address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
           "routes": [{"dst": "::/0"}, {"dst": "0.0.0.0/0"}]}
    parsed = spec.parse_result(doc)
    assert parsed.addresses == ((IPv4Interface("10.1.0.2/24"), IPv4Address("10.1.0.1"), None),)
    assert parsed.routes == (Route(IPv4Network("0.0.0.0/0")),)
    with pytest.raises(CniError) as info:
        spec.parse_result({"cniVersion": "1.0.0", "code": 11, "msg": "busy"})
    assert info.value.code == 11
    with pytest.raises(CniError) as info:
        spec.parse_result({"ips": [{"address": "nonsense"}]})
    assert info.value.code == 6


@given(st.text(alphabet="abcdefABC0123456789_.-", min_size=1, max_size=200), st.text(min_size=1, max_size=15))
def test_host_veth_names(container_id: str, ifname: str) -> None:
    name = spec.host_veth_name(container_id, ifname)
    assert len(name) == 15 and name.startswith("vethwe") and name == spec.host_veth_name(container_id, ifname)
    if " " not in ifname:
        assert spec.parse_alias(spec.veth_alias(container_id, ifname)) == (container_id, ifname)


def test_alias_parsing_refuses_foreign() -> None:
    assert spec.parse_alias(None) is None
    assert spec.parse_alias("uplink to rack 3") is None
    assert spec.host_veth_name("a", "eth0") != spec.host_veth_name("a", "eth1")


@given(st.dictionaries(st.sampled_from(wire.FORWARDED), st.text(max_size=40).filter(lambda t: "\0" not in t)),
       st.binary(max_size=300), st.booleans())
def test_wire_roundtrip(env: dict[str, str], conf_bytes: bytes, has_fd: bool) -> None:
    frame = wire.encode_request(env, conf_bytes, has_fd)
    header = wire.parse_header(frame[:wire.HEADER_SIZE])
    assert header.has_fd == has_fd and header.conf_len == len(conf_bytes)
    body = frame[wire.HEADER_SIZE:]
    assert wire.parse_env(body[:header.env_len]) == env
    assert body[header.env_len:] == conf_bytes


@given(st.binary(min_size=16, max_size=16))
def test_wire_header_fuzz(data: bytes) -> None:
    try:
        header = wire.parse_header(data)
    except wire.FrameError:
        return
    assert header.env_len <= wire.MAX_ENV and header.conf_len <= wire.MAX_CONF


@pytest.mark.parametrize("data", [b"CNI_COMMAND=ADD", b"PATH=/bin\0", b"CNI_COMMAND=ADD\0CNI_COMMAND=DEL\0",
                                  b"CNI_ARGS\0", b"CNI_ARGS=\xff\0"])
def test_wire_env_refused(data: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.parse_env(data)


def test_wire_limits_and_answer() -> None:
    with pytest.raises(wire.FrameError):
        wire.parse_header(b"WCN1" + (wire.MAX_ENV + 1).to_bytes(4, "big") + bytes(8))
    with pytest.raises(wire.FrameError):
        wire.parse_header(b"WCN1" + bytes(4) + (wire.MAX_CONF + 1).to_bytes(4, "big") + bytes(4))
    with pytest.raises(wire.FrameError):
        wire.parse_header(b"XXXX" + bytes(12))
    assert wire.parse_answer(wire.encode_answer(1, b'{"code": 11}')) == (1, b'{"code": 11}')
    with pytest.raises(ValueError):
        wire.encode_answer(256, b"")


def test_conflist_chains_portmap() -> None:
    doc = conflist.conflist(socket="/run/x.sock", spool="/var/spool/x")
    assert doc["cniVersion"] == "1.0.0" and doc["name"] == "weave"
    first, second = doc["plugins"]
    assert first == {"type": "weave-net", "hairpinMode": True, "daemonSocket": "/run/x.sock",
                     "spoolDir": "/var/spool/x"}
    assert second["type"] == "portmap" and second["capabilities"] == {"portMappings": True}
    # every plugin entry, as a runtime sends it, parses as a valid weave-net configuration
    spec.parse_request(BASE_ENV, json.dumps({**first, "cniVersion": doc["cniVersion"], "name": doc["name"]}).encode())


def test_cni_settings_defaults() -> None:
    """The default socket is the forwarder's default only with the default state dir (daemons sharing a mount
    namespace with other state dirs — lab nodes, tests — never share a socket)."""
    default = parse_settings({}, {}, "host")
    assert default.cni_socket == Path(DEFAULT_CNI_SOCKET) and default.cni_spool == Path("/var/lib/weave/cni-pending")
    lab = parse_settings({"state_dir": "/run/lab/n1"}, {}, "host")
    assert lab.cni_socket == Path("/run/lab/n1/cni.sock") and lab.cni_spool == Path("/run/lab/n1/cni-pending")
    assert parse_settings({}, {"WEAVE_CNI_SOCKET": "off"}, "host").cni_socket is None
    assert parse_settings({"cni_socket": "/x.sock"}, {"WEAVE_CNI_SOCKET": "/y.sock"}, "h").cni_socket == Path("/x.sock")
    with pytest.raises(ConfigError):
        parse_settings({"cni_socket": "/" + "x" * 120}, {}, "host")
