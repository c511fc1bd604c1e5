"""Settings from flags and environment: Weave's variable names, flag precedence, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from weaved import cli
from weaved.adapters.client import control_socket
from weaved.config import (
    DEFAULT_API_SOCKET,
    ConfigError,
    HostPort,
    Settings,
    describe_init,
    parse_host_port,
    parse_peer_list,
    parse_settings,
)
from weaved.core.ipam.seeding import ConsensusInit, SeedInit


def settings(env: dict[str, str] | None = None, hostname: str = "node-0", **flags: Any) -> Settings:
    return parse_settings(flags, env or {}, hostname)


def test_defaults_follow_weave_net() -> None:
    s = settings()
    assert s.peers == ()
    assert s.port == 6783
    assert s.host == "0.0.0.0"
    assert s.conn_limit == 200
    assert s.http_addr == HostPort("127.0.0.1", 6784)
    assert s.metrics_addr == HostPort("0.0.0.0", 6782)
    assert s.nickname == "node-0"
    assert s.state_dir == Path("/var/lib/weave")
    assert (s.log_format, s.log_level) == ("console", "info")


def test_environment_is_read_with_weave_names() -> None:
    s = settings({
        "WEAVE_PORT": "7000", "CONN_LIMIT": "30", "WEAVE_HTTP_ADDR": "127.0.0.1:7001",
        "WEAVE_METRICS_ADDR": ":7002", "HOSTNAME": "worker-3", "WEAVE_STATE_DIR": "/tmp/w",
        "WEAVE_LOG_FORMAT": "JSON", "WEAVE_LOG_LEVEL": "Debug",
    })
    assert (s.port, s.conn_limit) == (7000, 30)
    assert s.http_addr == HostPort("127.0.0.1", 7001)
    assert s.metrics_addr == HostPort("0.0.0.0", 7002), "':PORT' means every interface, as in Weave's ':6782'"
    assert s.nickname == "worker-3"
    assert s.state_dir == Path("/tmp/w")
    assert (s.log_format, s.log_level) == ("json", "debug")


def test_flags_win_over_environment() -> None:
    env = {"WEAVE_PORT": "7000", "CONN_LIMIT": "30", "HOSTNAME": "from-env", "WEAVE_LOG_FORMAT": "json"}
    s = settings(env, port="7100", conn_limit="5", nickname="from-flag", log_format="console")
    assert (s.port, s.conn_limit, s.nickname, s.log_format) == (7100, 5, "from-flag", "console")


def test_peers_from_flags_and_both_variables_space_or_comma_separated() -> None:
    s = settings({"KUBE_PEERS": "10.0.0.2 10.0.0.3", "WEAVE_PEERS": "10.0.0.4,node-5:7000"},
                 peer=["10.0.0.1:6790", "10.0.0.2"])
    assert s.peers == (
        HostPort("10.0.0.1", 6790),
        HostPort("10.0.0.2", 6783),  # named twice (flag and KUBE_PEERS): kept once
        HostPort("10.0.0.4", 6783),
        HostPort("node-5", 7000),
        HostPort("10.0.0.3", 6783),
    )


def test_peers_default_to_the_configured_port() -> None:
    assert settings({"WEAVE_PORT": "7000"}, peer=["10.0.0.1"]).peers == (HostPort("10.0.0.1", 7000),)


def test_peer_list_tolerates_mixed_separators_and_blanks() -> None:
    assert parse_peer_list(" a ,, b\n\tc:1 ", 6783, "KUBE_PEERS") == [
        HostPort("a", 6783), HostPort("b", 6783), HostPort("c", 1)]
    assert parse_peer_list("", 6783, "KUBE_PEERS") == []


@pytest.mark.parametrize(("text", "expected"), [
    ("10.1.2.3", HostPort("10.1.2.3", 6783)),
    ("10.1.2.3:99", HostPort("10.1.2.3", 99)),
    ("node-1.example.org:100", HostPort("node-1.example.org", 100)),
    ("[2001:db8::1]:5", HostPort("2001:db8::1", 5)),
    ("[2001:db8::1]", HostPort("2001:db8::1", 6783)),
    ("2001:db8::1", HostPort("2001:db8::1", 6783)),
    (":6782", HostPort("0.0.0.0", 6782)),
])
def test_host_port_forms(text: str, expected: HostPort) -> None:
    assert parse_host_port(text, 6783, "x") == expected


def test_host_port_prints_ipv6_in_brackets() -> None:
    assert str(HostPort("2001:db8::1", 5)) == "[2001:db8::1]:5"
    assert str(HostPort("10.0.0.1", 5)) == "10.0.0.1:5"


@pytest.mark.parametrize(("flags", "env", "fragment"), [
    ({"port": "abc"}, {}, "--port/WEAVE_PORT: expected a whole number"),
    ({}, {"WEAVE_PORT": "70000"}, "out of range"),
    ({"port": "0"}, {}, "out of range"),
    ({"conn_limit": "0"}, {}, "at least 1"),
    ({}, {"CONN_LIMIT": "lots"}, "--conn-limit/CONN_LIMIT"),
    ({"peer": ["10.0.0.1:x"]}, {}, "--peer: port must be a number"),
    ({}, {"KUBE_PEERS": "bad_host!"}, "KUBE_PEERS: 'bad_host!' is neither an IP address nor a host name"),
    ({"peer": ["[2001:db8::1]:6783"]}, {}, "IPv6 peers are not supported"),
    ({"peer": ["[2001:db8::1"]}, {}, "malformed address"),
    ({"http_addr": "127.0.0.1:99999"}, {}, "--http-addr/WEAVE_HTTP_ADDR: port 99999 out of range"),
    ({"metrics_addr": "127.0.0.1:6784"}, {}, "must differ"),
    ({"log_format": "xml"}, {}, "--log-format/WEAVE_LOG_FORMAT: 'xml' is not one of console, json"),
    ({"log_level": "loud"}, {}, "--log-level"),
    ({"host": "example.org"}, {}, "--host: 'example.org' is not an IPv4 address"),
    ({"nickname": "  "}, {}, "--nickname: must not be empty"),
    ({"nickname": "n" * 65}, {}, "at most 64 characters"),
    ({"password_file": "/p"}, {"WEAVE_PASSWORD": "s3cret"}, "give the password once"),
    ({}, {"WEAVE_PASSWORD": "  "}, "WEAVE_PASSWORD is set but blank"),
    ({"trusted_subnets": "10.0.0.0/8,bogus"}, {}, "'bogus' is not an IPv4 CIDR"),
])
def test_bad_values_give_one_line_errors(flags: dict[str, Any], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(flags, env, "node-0")
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_nickname_falls_back_to_hostname_env_then_host_name_and_is_cut_to_fit() -> None:
    assert settings({"HOSTNAME": "  "}, hostname="box").nickname == "box"
    assert settings({}, hostname="").nickname == "weaved"
    long_name = "a" * 50 + "." + "b" * 50
    assert settings({"HOSTNAME": long_name}).nickname == long_name[:64]


def test_cli_reports_a_bad_setting_in_one_line_with_status_2(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONN_LIMIT", "-3")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err == "weaved: --conn-limit/CONN_LIMIT: must be at least 1, got -3\n"


def test_cli_client_commands_reject_a_malformed_api_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--api", "127.0.0.1:notaport"]) == 2
    assert capsys.readouterr().err.startswith("weaved: --api/WEAVE_HTTP_ADDR: port must be a number")


def test_the_control_socket_is_per_state_dir_unless_given() -> None:
    """Lab nodes (and tests) run several daemons on one filesystem: each gets its own control socket."""
    assert settings().api_socket == Path(DEFAULT_API_SOCKET) == Path("/run/weave/weaved.sock")
    assert settings(state_dir="/run/lab/n1").api_socket == Path("/run/lab/n1/weaved.sock")
    assert settings({"WEAVE_STATE_DIR": "/run/lab/n2"}).api_socket == Path("/run/lab/n2/weaved.sock")
    assert settings({"WEAVE_API_SOCKET": "/y.sock"}).api_socket == Path("/y.sock")
    assert settings({"WEAVE_API_SOCKET": "/y.sock"}, api_socket="/x.sock").api_socket == Path("/x.sock")
    with pytest.raises(ConfigError, match=r"--api-socket/WEAVE_API_SOCKET: .* longer than a unix socket path"):
        settings(api_socket="/" + "x" * 120)


def test_the_cli_finds_the_daemons_control_socket_by_the_same_rule() -> None:
    assert control_socket(None, {}) == Path(DEFAULT_API_SOCKET)
    assert control_socket(None, {"WEAVE_STATE_DIR": "/run/lab/n1"}) == Path("/run/lab/n1/weaved.sock")
    assert control_socket(None, {"WEAVE_API_SOCKET": "/y.sock", "WEAVE_STATE_DIR": "/s"}) == Path("/y.sock")
    assert control_socket("/x.sock", {"WEAVE_API_SOCKET": "/y.sock"}) == Path("/x.sock")


def test_cli_control_commands_reject_a_socket_path_too_long(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["connect", "10.0.0.1", "--api-socket", "/" + "x" * 120]) == 2
    assert capsys.readouterr().err.startswith("weaved: --api-socket/WEAVE_API_SOCKET: ")


def test_ipam_defaults_follow_weave_on_kubernetes() -> None:
    s = settings()
    assert str(s.ipalloc_range) == "10.32.0.0/12"
    assert s.ipalloc_init == ConsensusInit(1), "no peers given: ourselves only"
    two = settings({"KUBE_PEERS": "10.0.0.2 10.0.0.3"}, peer=["10.0.0.2"])
    assert two.ipalloc_init == ConsensusInit(3), "the distinct peers given, plus ourselves"
    assert describe_init(two.ipalloc_init) == "consensus=3"


def test_ipam_settings_from_environment_and_flags() -> None:
    s = settings({"IPALLOC_RANGE": " 10.40.0.0/23 ", "IPALLOC_INIT": "consensus=5"})
    assert (str(s.ipalloc_range), s.ipalloc_range.size) == ("10.40.0.0/23", 512)
    assert s.ipalloc_init == ConsensusInit(5)
    names = "aa:bb:cc:dd:ee:02,AA:BB:CC:DD:EE:01"
    s = settings({"IPALLOC_INIT": "observer"}, ipalloc_range="192.168.0.0/16", ipalloc_init="seed=" + names)
    assert str(s.ipalloc_range) == "192.168.0.0/16"
    assert s.ipalloc_init == SeedInit(("aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"))
    assert describe_init(s.ipalloc_init) == "seed=aa:bb:cc:dd:ee:01,aa:bb:cc:dd:ee:02"
    assert describe_init(settings({"IPALLOC_INIT": "observer"}).ipalloc_init) == "observer"


@pytest.mark.parametrize(("flags", "env", "fragment"), [
    ({}, {"IPALLOC_RANGE": "10.32.0.1/12"}, "--ipalloc-range/IPALLOC_RANGE: '10.32.0.1/12' is not an IPv4 network"),
    ({}, {"IPALLOC_RANGE": "10.32.0.1/12"}, "host bits set"),
    ({"ipalloc_range": "10.32.0.0"}, {}, "no prefix length"),
    ({"ipalloc_range": "2001:db8::/64"}, {}, "IPv4 range required"),
    ({"ipalloc_range": "banana"}, {}, "--ipalloc-range/IPALLOC_RANGE"),
    ({}, {"IPALLOC_INIT": "consensus=x"}, "--ipalloc-init/IPALLOC_INIT: consensus=N needs a number"),
    ({}, {"IPALLOC_INIT": "consensus=0"}, "--ipalloc-init/IPALLOC_INIT: consensus needs the number"),
    ({"ipalloc_init": "seed=nobody"}, {}, "--ipalloc-init/IPALLOC_INIT: seed= needs peer names"),
    ({"ipalloc_init": "leader"}, {}, "must be consensus[=N], seed=NAME,... or observer"),
])
def test_bad_ipam_settings_give_one_line_errors(flags: dict[str, Any], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(flags, env, "node-0")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_ipalloc_range_with_status_2(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPALLOC_RANGE", "10.32.0.0/40")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weaved: --ipalloc-range/IPALLOC_RANGE: '10.32.0.0/40' is not an IPv4 network")
    assert err.count("\n") == 1


def test_the_password_comes_from_the_environment_or_a_file_and_never_shows_in_repr() -> None:
    settings = parse_settings({}, {"WEAVE_PASSWORD": "s3cret-value"}, "node-0")
    assert settings.password == b"s3cret-value" and settings.password_file is None
    assert "s3cret-value" not in repr(settings)
    from_file = parse_settings({"password_file": "/etc/weave-passwd/weave-passwd"},
                               {"WEAVE_PASSWORD_FILE_OPTIONAL": "1"}, "node-0")
    assert from_file.password is None and str(from_file.password_file) == "/etc/weave-passwd/weave-passwd"
    assert from_file.password_file_optional
    assert parse_settings({}, {}, "node-0").password is None


def test_trusted_subnets_are_a_list_of_cidrs() -> None:
    settings = parse_settings({}, {"WEAVE_TRUSTED_SUBNETS": "10.0.0.0/8, 192.168.1.0/24"}, "node-0")
    assert [str(n) for n in settings.trusted_subnets] == ["10.0.0.0/8", "192.168.1.0/24"]
