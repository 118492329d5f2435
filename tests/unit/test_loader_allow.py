"""The sidecar's allow-list compares parsed URI components, never string prefixes, and is
deny-by-default on a port other hosts can reach; a peer on another host needs TLS (M5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.errors import AccessDenied, SourceError
from loader.sidecar.allow import check_allowed, parse_rule
from loader.sidecar.config import LoaderConfig


def rules(*entries: str) -> list:  # type: ignore[type-arg]
    return [parse_rule(e) for e in entries]


@pytest.mark.parametrize(
    ("entry", "uri"),
    [
        ("s3://models", "s3://models/llama/"),
        ("s3://models", "s3://models"),
        ("s3://models/llama", "s3://models/llama/7b/model.safetensors"),
        ("https://hub.example.com", "https://hub.example.com/m/"),
        ("https://hub.example.com", "https://HUB.example.com:443/m/"),
        ("https://hub.example.com/org/", "https://hub.example.com/org/m/"),
        ("http://127.0.0.1:*", "http://127.0.0.1:8080/m/"),
        ("peer://10.0.0.5:7070/s3://b/m", "peer://10.0.0.5:7070/s3://b/m/"),
        ("*", "s3://anything/at/all"),
    ],
)
def test_entries_admit_what_lies_under_them(entry: str, uri: str) -> None:
    check_allowed(uri, rules(entry))


@pytest.mark.parametrize(
    ("entry", "uri"),
    [
        ("s3://models", "s3://models-private/llama/"),
        ("s3://models/llama", "s3://models/llama2/"),
        ("https://hub.example.com", "https://hub.example.com.evil.net/m/"),
        ("https://hub.example.com", "https://hub.example.com@evil.net/m/"),
        ("https://hub.example.com", "https://user:pw@hub.example.com/m/"),
        ("https://hub.example.com", "http://hub.example.com/m/"),
        ("https://hub.example.com", "https://hub.example.com:8443/m/"),
        ("https://hub.example.com/org", "https://hub.example.com/org/../private/m/"),
        ("https://hub.example.com/org", "https://hub.example.com/organisation/m/"),
        ("https://hub.example.com", "https://hub.example.com/m/?x=https://evil.net"),
        ("http://127.0.0.1:*", "http://127.0.0.10:80/m/"),
        ("peer://10.0.0.5:7070/s3://b/m", "peer://10.0.0.5:7070/s3://b/model/"),
    ],
)
def test_look_alike_uris_are_refused(entry: str, uri: str) -> None:
    with pytest.raises(AccessDenied):
        check_allowed(uri, rules(entry))


def test_local_entries_compare_resolved_paths_on_segment_boundaries(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models-private").mkdir()
    (tmp_path / "models" / "link").symlink_to(tmp_path / "models-private")
    allowed = rules(str(tmp_path / "models"))
    check_allowed(str(tmp_path / "models" / "m"), allowed)
    for outside in ("models-private/m", "models/link/m", "models/../models-private"):
        with pytest.raises(AccessDenied):
            check_allowed(str(tmp_path / outside), allowed)


def test_no_rules_admit_everything_and_an_empty_list_nothing() -> None:
    check_allowed("s3://any/thing", None)
    with pytest.raises(AccessDenied, match="--allow"):
        check_allowed("s3://any/thing", [])


def test_the_allow_list_is_deny_by_default_on_a_port_other_hosts_reach(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    assert LoaderConfig().allow_rules is None  # the Unix socket: local users only
    assert LoaderConfig(listen="tcp://127.0.0.1:7070").allow_rules is None
    exposed = LoaderConfig(listen="tcp://0.0.0.0:7070", tls_cert=str(cert), tls_key=str(cert))
    assert exposed.allow_rules == []
    opened = LoaderConfig(
        listen="tcp://0.0.0.0:7070", tls_cert=str(cert), tls_key=str(cert), allow="s3://m"
    )
    assert opened.allow_rules == rules("s3://m")


def test_a_bad_allow_entry_fails_the_config() -> None:
    with pytest.raises(ValueError, match="absolute"):
        LoaderConfig(allow="models/")
    with pytest.raises(ValueError, match="user"):
        LoaderConfig(allow="https://a@b/")


def test_a_peer_on_another_host_without_tls_is_refused() -> None:
    pytest.importorskip("grpc")
    from loader.sidecar.client import SidecarClient
    from loader.sources import open_source
    from loader.sources.peer import PeerSource

    with pytest.raises(SourceError, match="TLS"):
        PeerSource("peer://10.0.0.5:7070/s3://bucket/m/")
    with pytest.raises(SourceError, match="TLS"):
        open_source("peer://peer.example.com:7070/s3://bucket/m/")
    with pytest.raises(ValueError, match="TLS"):
        SidecarClient("10.0.0.5:7070")
    for local in ("peer://127.0.0.1:7070/m", "peer://localhost:7070/m", "peer://[::1]:7070/m"):
        PeerSource(local).close()  # loopback: allowed, nothing dialled yet
    SidecarClient("unix:/nonexistent.sock").close()


# -- encodings and hidden characters that make the URI sent differ from the URI checked -----

PUBLIC = "http://127.0.0.1:8080/public"


@pytest.mark.parametrize(
    "uri",
    [
        PUBLIC + "/%2e%2e/private/",  # nginx decodes, then removes the dot segments
        PUBLIC + "/%2E%2E/private/",
        PUBLIC + "/.%2e/private/",
        PUBLIC + "/%2e./private/",
        PUBLIC + "/%2e/model/",
        PUBLIC + "/%252e%252e/private/",  # decoded twice by a proxy and a server
        PUBLIC + "%2f..%2fprivate/",  # an encoded slash makes one segment two
        PUBLIC + "/m%2F..%2F..%2Fprivate/",
        PUBLIC + "/m%5c..%5c..%5cprivate/",
        PUBLIC + "/m%5C..%5Cprivate/",
        PUBLIC + "\\..\\private/",  # WHATWG parsers read a backslash as a slash
        PUBLIC + "/m/%00/",
        PUBLIC + "/m/%0a/",
        PUBLIC + "/m/%ff/",  # not UTF-8: what it decodes to depends on the server
    ],
)
def test_percent_encoded_dot_segments_and_slashes_are_refused(uri: str) -> None:
    with pytest.raises(AccessDenied):
        check_allowed(uri, rules(PUBLIC))


@pytest.mark.parametrize(
    "uri",
    [
        "https://hub.exa\tmple.com/m/x",  # urlsplit drops the tab: checked as hub.example.com
        "https://hub.example.com\n/m/x",
        "https://hub.example.com/m/\rx",
        "https://hub.example.com/m /x",
        "https://hub.example.com/m/\u00a0x",  # no-break space
        "https://hub.example.com\u200b/m/x",  # zero-width space
        "https://hub.example.com/m/\u202ex",  # right-to-left override
        "https://hub.example.com/m/\x7fx",
        "https://hub.example.com%2eevil.net/m/x",  # a percent-encoded host
    ],
)
def test_whitespace_control_characters_and_encoded_hosts_are_refused(uri: str) -> None:
    with pytest.raises(AccessDenied):
        check_allowed(uri, rules("https://hub.example.com"))


@pytest.mark.parametrize(
    "entry",
    ["https://hub.exa\tmple.com", "http://h/public/%2e%2e", "http://h/a%2fb", "http://h\\x"],
)
def test_allow_entries_with_those_forms_fail_the_config(entry: str) -> None:
    with pytest.raises(ValueError, match="allow entry"):
        parse_rule(entry)


def test_ordinary_percent_encodings_are_still_admitted() -> None:
    check_allowed(PUBLIC + "/my%20model/x%2Bq.safetensors", rules(PUBLIC))
    check_allowed(PUBLIC + "/my%20model/", rules(PUBLIC + "/my%20model"))
    check_allowed("peer://127.0.0.1:7070/s3://b/m%20x/", rules("peer://127.0.0.1:7070/s3://b"))
    with pytest.raises(AccessDenied):  # paths compare as written: S3 keys are literal
        check_allowed("s3://b/pub%6cic/x", rules("s3://b/public"))


# -- a TCP address other hosts can reach needs client certificates (mutual TLS) -------------


def test_serving_off_loopback_needs_mutual_tls_or_an_explicit_insecure_clients(
    tmp_path: Path,
) -> None:
    pem = str(tmp_path / "c.pem")

    def config(listen: str, **more: object) -> LoaderConfig:
        return LoaderConfig(listen=listen, tls_cert=pem, tls_key=pem, **more)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="--tls-client-ca .*--insecure-clients"):
        config("tcp://0.0.0.0:7070").check_serving()
    with pytest.raises(ValueError, match="client certificates"):
        config("tcp://sidecar.example.com:7070").check_serving()
    config("tcp://0.0.0.0:7070", tls_client_ca=pem).check_serving()
    config("tcp://0.0.0.0:7070", insecure_clients=True).check_serving()
    for local in ("", "unix:/tmp/x.sock", "tcp://127.0.0.1:7070", "tcp://[::1]:7070"):
        LoaderConfig(listen=local).check_serving()
    # the verbs that dial such a sidecar read the same settings and need no CA of their own
    config("tcp://0.0.0.0:7070", tls_client_cert=pem, tls_client_key=pem)


def test_a_client_verb_dials_a_remote_sidecar_with_only_the_ca(tmp_path: Path) -> None:
    """`shoal loader list --listen tcp://10.0.0.5:7070 --tls-ca ca.pem` reads the same
    settings as `serve`: only serving needs a server certificate."""
    pem = str(tmp_path / "ca.pem")
    client_side = LoaderConfig(listen="tcp://10.0.0.5:7070", tls_ca=pem)
    with pytest.raises(ValueError, match="--tls-cert"):
        client_side.check_serving()


def test_the_serve_help_renders_and_names_the_exposure_flags() -> None:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "shoal", "loader", "serve", "--help"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="200"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # argparse fails on a bare % in a help text
    assert "--insecure-clients" in done.stdout and "--tls-client-ca (mutual TLS)" in done.stdout
