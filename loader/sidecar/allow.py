"""The sidecar's allow-list: which checkpoint URIs clients may have it stage (M5).

An entry and a requested URI are both *parsed*, and compared component by component;
nothing is compared as a string prefix::

    entry                              admits                      does not admit
    /models  (or file:///models)       /models, /models/a/b        /models-private, /etc
    s3://models                        s3://models/x/              s3://models-private/x
    s3://models/llama                  s3://models/llama/7b/       s3://models/llama2/
    https://hub.example.com            https://hub.example.com/m/  https://hub.example.com.evil.net/
                                                                   https://hub.example.com@evil.net/
                                                                   http://hub.example.com/m/
                                                                   https://hub.example.com:8443/m/
    https://hub.example.com:*/m        any port of that host, under /m
    peer://10.0.0.5:7070/s3://b/       that peer, that checkpoint URI and what lies under it
    *                                  anything (an explicit opt-in)

1. Scheme and host compare exactly (hosts case-insensitively, as DNS does); the port must
   be equal, a missing one meaning the scheme's default, unless the entry says ``:*``.
2. A URI carrying user information (``user@host``), a query, a fragment, or a ``.``/``..``
   path segment is refused outright: each is a way to make a URI mean another host or path
   than it seems to (urllib3 removes dot segments before sending). So is one whose path,
   percent-decoded once or repeatedly, has such a segment or a slash or backslash inside
   a segment (``/public/%2e%2e/private``: urllib3 sends ``%2e%2e`` as is and nginx decodes
   and removes it, M5), and one with a backslash, a ``%`` in the host, or a whitespace or
   control character anywhere (``urlsplit`` silently drops tabs and newlines, so
   ``https://hub.exa<TAB>mple.com`` would be checked as a host it does not name).
3. The path matches on a segment boundary: the entry's path with trailing slashes dropped
   is the URI's path or a leading run of its segments, compared as written (not decoded:
   an S3 key is literal, so ``s3://b/pub%6cic`` is not ``s3://b/public``; an HTTP path
   written two ways is refused, never wrongly admitted). For ``s3://`` the bucket is the
   host, so ``s3://models`` admits no other bucket.
4. Local paths (no scheme, or ``file://``) are resolved (symlinks, ``..``) on both sides
   first, then compared as paths.

``None`` rules (no list at all) admit everything: the default on a Unix socket or a loopback
port, where only local users can ask. The server passes an empty list on a port other
hosts can reach when no ``--allow`` is given: deny by default (``LoaderConfig.allow_rules``).

Pure: no gRPC, no I/O but ``Path.resolve``.
"""

from __future__ import annotations

import posixpath
import unicodedata
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loader.errors import AccessDenied

__all__ = ["AllowRule", "check_allowed", "parse_rule"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "s3": None, "peer": None}
ANY_PORT = -1


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One parsed entry: ``scheme`` "" for local paths; ``port`` ``ANY_PORT`` for ``:*``;
    ``path`` without trailing slashes ("" = every path); ``everything`` for ``*``."""

    scheme: str
    host: str
    port: int | None
    path: str
    everything: bool = False


@dataclass(frozen=True, slots=True)
class _Parsed:
    scheme: str
    host: str
    port: int | None
    path: str


def parse_rule(entry: str) -> AllowRule:
    """``entry`` parsed; ``ValueError`` naming the problem for one that cannot be."""
    entry = entry.strip()
    if entry == "*":
        return AllowRule("", "", None, "", everything=True)
    if "://" not in entry or entry.startswith("file://"):
        local = entry.removeprefix("file://")
        if not local.startswith("/"):
            raise ValueError(f"allow entry {entry!r}: a local path must be absolute")
        return AllowRule("", "", None, str(Path(local).resolve()))
    any_port = False
    scheme, _, rest = entry.partition("://")
    netloc, slash, path = rest.partition("/")
    if netloc.endswith(":*"):
        netloc, any_port = netloc[:-2], True
    try:
        parsed = _parse_remote(f"{scheme}://{netloc}{slash}{path}")
    except AccessDenied as exc:
        raise ValueError(f"allow entry {entry!r}: {exc}") from None
    return AllowRule(parsed.scheme, parsed.host, ANY_PORT if any_port else parsed.port, parsed.path)


def check_allowed(uri: str, rules: Sequence[AllowRule] | None) -> None:
    """Nothing if ``rules`` admit ``uri``, else ``AccessDenied`` naming it."""
    if rules is None or any(rule.everything for rule in rules):
        return
    if not rules:
        raise AccessDenied(
            f"{uri}: this sidecar listens on a port other hosts can reach and has no allow "
            "list, so it stages nothing; start it with --allow (URI prefixes, or * for any)"
        )
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).resolve()
        for rule in rules:
            if rule.scheme == "" and (str(path) == rule.path or Path(rule.path) in path.parents):
                return
    else:
        parsed = _parse_remote(uri)
        for rule in rules:
            if _admits(rule, parsed):
                return
    described = ", ".join(_describe(rule) for rule in rules)
    raise AccessDenied(f"{uri} is outside the sidecar's allowed roots ({described})")


def _admits(rule: AllowRule, uri: _Parsed) -> bool:
    if rule.scheme != uri.scheme or rule.host != uri.host:
        return False
    if rule.port not in (ANY_PORT, uri.port):
        return False
    return not rule.path or uri.path == rule.path or uri.path.startswith(rule.path + "/")


def _parse_remote(uri: str) -> _Parsed:
    """Components of a remote URI, refusing the forms of point 2. A ``peer://`` URI's path
    is the checkpoint URI it names (itself with ``://``), compared as a string path."""
    _refuse_hidden_characters(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise AccessDenied(f"{uri!r} is not a URI the sidecar can check: {exc}") from None
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise AccessDenied(f"{uri!r}: user information (user@host) is refused in a URI")
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise AccessDenied(f"{uri!r}: a query or fragment is refused in a checkpoint URI")
    if "%" in parts.netloc:
        raise AccessDenied(f"{uri!r}: a percent-encoded host is refused")
    host = (parts.hostname or "").lower()
    if not host:
        raise AccessDenied(f"{uri!r} names no host")
    path = parts.path
    _refuse_encoded_escapes(uri, path)
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    normalized = posixpath.normpath(path) if path.strip("/") else ""
    if scheme == "peer":  # the checkpoint URI inside keeps its "://"
        normalized = path.rstrip("/")
    return _Parsed(scheme, host, port, normalized.rstrip("/"))


def _refuse_hidden_characters(uri: str) -> None:
    """``AccessDenied`` for a backslash, whitespace or a control (or other invisible)
    character anywhere in ``uri``: ``urlsplit`` drops tabs and newlines, and clients and
    servers read ``\\`` as ``/``, so the URI checked would not be the URI sent."""
    for char in uri:
        if char == "\\":
            raise AccessDenied(f"{uri!r}: a backslash is refused in a remote URI")
        if char.isspace() or unicodedata.category(char)[0] in "CZ":
            raise AccessDenied(
                f"{uri!r}: whitespace or control character {char!r} is refused in a remote URI"
            )


def _refuse_encoded_escapes(uri: str, path: str) -> None:
    """``AccessDenied`` if percent-decoding ``path``, once or until nothing changes, yields
    a ``.``/``..`` segment, a ``/`` or ``\\`` inside a segment, or a control character:
    forms a server may decode into a path outside the one checked (urllib3 sends ``%2e``
    and ``%2f`` as written; nginx decodes them and then removes dot segments)."""
    for segment in path.split("/"):
        layer = segment
        for _ in range(8):  # %252e -> %2e -> . ; deeper nesting is refused below
            if layer in (".", "..") or "/" in layer or "\\" in layer:
                raise AccessDenied(
                    f"{uri!r}: '.' and '..' path segments, and '/' or '\\' inside a segment, "
                    "are refused, percent-encoded or not"
                )
            if any(unicodedata.category(c)[0] == "C" for c in layer):
                raise AccessDenied(f"{uri!r}: an encoded control character is refused")
            try:
                unquoted = urllib.parse.unquote(layer, errors="strict")
            except UnicodeDecodeError:
                raise AccessDenied(f"{uri!r}: a percent-encoding that is not UTF-8") from None
            if unquoted == layer:
                break
            layer = unquoted
        else:
            raise AccessDenied(f"{uri!r}: a path percent-encoded this many times is refused")


def _describe(rule: AllowRule) -> str:
    if rule.everything:
        return "*"
    if not rule.scheme:
        return rule.path
    port = "" if rule.port is None else (":*" if rule.port == ANY_PORT else f":{rule.port}")
    return f"{rule.scheme}://{rule.host}{port}{rule.path}"
