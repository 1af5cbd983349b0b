"""The gateway's nginx front: a configuration that serves WADO-RS retrieves without a Python hop per request.

`bridge serve` alone relays every image byte through Python, which adds about a millisecond per
request (docs/performance.md). The front is an nginx in front of `bridge serve`: for a WADO-RS
retrieve (a study, series or instance, its metadata, frames, rendered or thumbnail) it asks the
bridge once whether the caller may see the study (`GRANT_PATH`, sent with the front's shared
secret), keeps a granted answer for a few seconds (the bridge says how long: never past the
session's or token's end), and meanwhile sends that caller's retrieves of that study straight to
the archive with the bridge's credentials for it. Everything else, and anything the fast path
does not plainly serve (a refusal, a missing credential, an archive error, an unusual path), goes
to `bridge serve` itself, which answers it exactly as without the front, audit included.

This module is pure: it writes the configuration (`bridge front-config`) and names what the
bridge and the configuration must agree on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge.config import Settings, SourceSettings
from bridge.cookies import HOST_PREFIX, VALUE, cookie_name, spellings
from bridge.errors import ConfigurationError
from bridge.gateway.proxy import FORWARDED_REQUEST

GRANT_PATH = "/gateway/front/grant"  # the bridge's route the front asks
SECRET_HEADER = "x-bridge-front-secret"  # the shared secret, sent by the front with each question
PATH_HEADER = "x-bridge-path"  # the retrieve asked for, relative to /dicom-web: "studies/1.2/metadata"
# The grant's answer: where to send the retrieve, the archive's Host, and the bridge's credentials.
FORWARD_HEADER = "x-bridge-forward"
HOST_HEADER = "x-bridge-archive-host"  # its Host header: host[:port]
NAME_HEADER = "x-bridge-archive-name"  # its host name alone, for TLS's server name
AUTHORIZATION_HEADER = "x-bridge-archive-authorization"
SYSTEM_CA_FILE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's CA bundle, for archives over https

_UID = r"[0-9][0-9.]{0,63}"
_RENDER = r"(?:metadata|rendered|thumbnail)"
_FRAMES = r"frames/[0-9][0-9,]{0,8191}(?:/(?:rendered|thumbnail))?"
# The retrieves the fast path serves, relative to /dicom-web; group 1: the Study Instance UID,
# group 2: the Series Instance UID (if the path names one; grants are kept per series). A
# narrower grammar than bridge/gateway/paths.py (no bulk data, no searches): every segment is a
# keyword or starts with a digit, so the raw path and nginx's normalised one cannot differ.
RETRIEVE = (
    rf"studies/({_UID})(?:/{_RENDER}|/series/({_UID})(?:/{_RENDER}|/instances/{_UID}"
    rf"(?:/{_RENDER}|/{_FRAMES})?)?)?"
)
_RETRIEVE = re.compile(RETRIEVE)
# Headers of a caller's request the archive gets: the gateway's, and the caller's encoding as asked.
_FORWARDED = (*FORWARDED_REQUEST, "accept-encoding")
# Headers of the archive's answer the caller never gets: its cookies, addresses and caching advice.
HIDDEN_RESPONSE = (
    "Set-Cookie",
    "Location",
    "Content-Location",
    "Cache-Control",
    "Expires",
    "Pragma",
    "WWW-Authenticate",
    "Server",
    "X-Powered-By",
)
# Statuses the fast path hands to the bridge, which answers them as it would without the front: every
# error, so no archive's error body reaches a caller (it may tell another patient's UID from an unknown
# one). nginx takes error pages for 300 to 599 but never 499, its own "client closed the connection".
HANDED_ON = tuple(code for code in range(400, 600) if code != 499)
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx's temporary folders
# Up to a megabyte of an archive's answer in memory, never on disk: a slice in one pass, and a large
# answer paced by the caller (nginx stops reading the archive while its buffers are full).
ANSWER_BUFFERS = (
    "proxy_buffer_size 64k;",
    "proxy_buffers 16 64k;",
    "proxy_busy_buffers_size 256k;",
    "proxy_max_temp_file_size 0;",
)
_LISTEN = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$|^[0-9]{1,5}$")


def cookie_patterns(name: str) -> dict[str, str]:
    """The regular expressions nginx reads cookie ``name`` with, as bridge/cookies.py `read` does.

    Each is searched in the request's Cookie headers, which nginx joins with "; " (``$http_cookie``):

    - ``session``: group 1 is the one value, written as a browser writes it;
    - ``odd``: a pair whose name spells either of the cookie's names (plain or __Host-) with other
      characters than printable ASCII in or around it, but for the one space after ``;``;
    - ``twice``: two pairs of that name;
    - ``unsound``: a value the bridge never makes.

    They are plain PCRE that Python's ``re`` reads alike (tests/unit/gateway/test_front.py holds
    them to `read` on adversarial headers), and hold no character nginx's quoted strings change.
    """
    junk = r"[^\x21-\x7e]"  # what `read` drops from a name before comparing it

    def spelled(text: str) -> str:
        return "".join(re.escape(c) + junk + "*" for c in text)

    base = spellings(name)[0]
    either = f"(?:{re.escape(HOST_PREFIX)})?{re.escape(base)}="  # either name, as a browser writes it
    either_spelled = f"{junk}*(?:{spelled(HOST_PREFIX)})?{spelled(base)}="
    own_spelled = f"{junk}*{spelled(name)}="
    own, value = re.escape(name), VALUE.pattern
    return {
        "session": f"(?:^|; ?){own}=({value})(?:;|$)",
        "odd": f"(?:^(?!{either})|;(?! ?{either})){either_spelled}",
        "twice": f"(?:^|;){own_spelled}.*;{own_spelled}",
        "unsound": f"(?:^|; ?){own}=(?!{value}(?:;|$))",
    }


def _variable(header: str) -> str:
    """The nginx variable of a header: x-bridge-forward -> x_bridge_forward."""
    return header.lower().replace("-", "_")


def upstream_name(index: int) -> str:
    """The nginx upstream of the ``index``-th source's archive (the order of Settings.each_source)."""
    return f"bridge_archive_{index}"


def is_fast_path(path: str) -> bool:
    """Whether ``path`` (relative to /dicom-web) is a retrieve the front serves itself once granted."""
    return _RETRIEVE.fullmatch(path) is not None


@dataclass(frozen=True)
class FrontOptions:
    """Where the front listens and what it reaches; `bridge front-config`'s options."""

    listen: str = "127.0.0.1:8080"
    bridge: str = "http://127.0.0.1:8000"
    state_dir: Path = Path("/var/lib/bridge-front")
    certificate: Path | None = None  # TLS for callers; both or neither
    certificate_key: Path | None = None
    workers: int = 1
    user: str | None = None  # the workers' user when nginx starts as root


def _host_port(url: str, what: str) -> tuple[str, str]:
    """(host:port, path) of an http(s) URL, or a ConfigurationError naming ``what``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{what}: {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", parts.path.rstrip("/")


def _quoted(value: str) -> str:
    if any(c in value for c in '"\\;{}$\n\r') or not value:
        raise ConfigurationError(f"{value!r} cannot be written into an nginx configuration")
    return f'"{value}"'


def _archive_tls(sources: Sequence[SourceSettings]) -> list[str]:
    """The front's TLS settings towards the archives; every archive over https must share them."""
    secure = [s for s in sources if urlsplit(s.dicomweb.base).scheme == "https"]
    if not secure:
        return []
    shapes = {(s.dicomweb.verify_tls, s.dicomweb.ca_bundle, s.dicomweb.client_cert, s.dicomweb.client_key)
              for s in secure}  # fmt: skip
    if len(shapes) > 1:
        raise ConfigurationError(
            "the front reaches every archive over https with one TLS set-up: give the sources the same "
            "BRIDGE_DICOMWEB_VERIFY_TLS, _CA_BUNDLE, _CLIENT_CERT and _CLIENT_KEY, or serve without the front"
        )
    verify, ca_bundle, client_cert, client_key = shapes.pop()
    lines = ["proxy_ssl_server_name on;", "proxy_ssl_name $x_bridge_archive_name;"]
    if verify:
        lines += [
            "proxy_ssl_verify on;",
            "proxy_ssl_verify_depth 4;",
            f"proxy_ssl_trusted_certificate {_quoted(str(ca_bundle or SYSTEM_CA_FILE))};",
        ]
    else:
        lines.append("proxy_ssl_verify off;")
    if client_cert is not None:
        lines.append(f"proxy_ssl_certificate {_quoted(str(client_cert))};")
        lines.append(f"proxy_ssl_certificate_key {_quoted(str(client_key or client_cert))};")
    return lines


def nginx_config(settings: Settings, options: FrontOptions) -> str:
    """The whole nginx configuration of the front (run it with ``nginx -e stderr -c FILE``)."""
    secret = settings.gateway.secret
    if secret is None:
        raise ConfigurationError(
            "BRIDGE_GATEWAY_FRONT_SECRET (or _FILE) is required: the front sends it with each question"
        )
    if not _LISTEN.match(options.listen):
        raise ConfigurationError(f"--listen: {options.listen!r} is not host:port or a port")
    if (options.certificate is None) != (options.certificate_key is None):
        raise ConfigurationError("--certificate and --certificate-key go together")
    bridge, bridge_path = _host_port(options.bridge, "--bridge")
    if bridge_path:
        raise ConfigurationError("--bridge: the bridge's address without a path (http://host:port)")
    state = options.state_dir
    deadline = f"{settings.http.deadline:g}s"
    upstreams = []
    for index, source in enumerate(settings.each_source()):
        address, _ = _host_port(source.dicomweb.base, f"BRIDGE_DICOMWEB_URL of source {source.name!r}")
        upstreams.append(f"    upstream {upstream_name(index)} {{ server {address}; keepalive 32; }}")
    listen = options.listen + (" ssl" if options.certificate is not None else "")
    tls_listen = (
        [
            f"        ssl_certificate {_quoted(str(options.certificate))};",
            f"        ssl_certificate_key {_quoted(str(options.certificate_key))};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
        ]
        if options.certificate is not None
        else []
    )
    secret_value = secret.get_secret_value()
    if not re.fullmatch(r"[\x21-\x7e]+", secret_value) or any(c in secret_value for c in '"\\;{}$'):
        raise ConfigurationError(
            "BRIDGE_GATEWAY_FRONT_SECRET: for the front, printable ASCII without spaces, quotes, "
            "backslashes, ';', '{', '}' or '$'"
        )
    # Every request nginx hands the bridge carries the secret: the bridge then believes the address
    # nginx adds to X-Forwarded-For (bridge/api/forwarded.py), and no other local caller's.
    to_bridge = [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        f'proxy_set_header {SECRET_HEADER} "{secret_value}";',
    ]
    # Pages, lookups and the gateway's own answers stream as the bridge writes them.
    streamed = ["proxy_buffering off;", "proxy_request_buffering off;", "proxy_read_timeout 3600s;"]
    to_archive = [
        "proxy_pass $x_bridge_forward/$bridge_path$is_args$args;",
        "proxy_http_version 1.1;",
        "proxy_pass_request_headers off;",  # the caller's cookies and credentials stay here
        'proxy_set_header Connection "";',
        "proxy_set_header Host $x_bridge_archive_host;",
        "proxy_set_header Authorization $x_bridge_archive_authorization;",
        *(f"proxy_set_header {name} $http_{_variable(name)};" for name in _FORWARDED),
        *ANSWER_BUFFERS,
        # An archive's X-Accel-* headers would steer nginx itself (internal redirects); never obeyed.
        "proxy_ignore_headers X-Accel-Redirect X-Accel-Expires X-Accel-Limit-Rate X-Accel-Buffering "
        "X-Accel-Charset Expires Cache-Control Set-Cookie Vary;",
        *(f"proxy_hide_header {name};" for name in HIDDEN_RESPONSE),
        'add_header Cache-Control "no-store" always;',
        f"proxy_connect_timeout {deadline};",
        f"proxy_read_timeout {deadline};",
        f"proxy_send_timeout {deadline};",
        "proxy_intercept_errors on;",
        *_archive_tls(settings.each_source()),
    ]
    handed_on = " ".join(str(code) for code in HANDED_ON)
    cookie = cookie_patterns(cookie_name(settings))
    user = [f"user {options.user};"] if options.user else []
    lines = [
        "# The FHIR-DICOMweb bridge's gateway front, written by `bridge front-config`. It holds the",
        "# front's shared secret: keep it readable by nginx's user only. Run: nginx -e stderr -c THIS_FILE",
        "daemon off;",
        *user,
        f"worker_processes {options.workers};",
        f"pid {state / 'nginx.pid'};",
        # Per-request error lines carry the request's path, UIDs included: only failures of nginx itself.
        "error_log stderr crit;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;  # paths name studies; the bridge logs its own requests by route",
        "    server_tokens off;",
        "    client_max_body_size 1m;",
        *(f"    {kind}_temp_path {state / kind};" for kind in TEMP_PATHS),
        # Grants only: never an image. Keyed by the study, the series and the caller's credentials,
        # as sent: a caller limited to one patient is granted only the series its study lists.
        f"    proxy_cache_path {state / 'grants'} levels=1:2 keys_zone=bridge_grants:4m max_size=64m "
        "inactive=10m use_temp_path=off;",
        f"    upstream bridge {{ server {bridge}; keepalive 32; }}",
        # The session cookie the bridge reads (every Cookie header, joined by nginx), read as the
        # bridge reads it (bridge/cookies.py), and whether the bridge refuses the headers: two of it,
        # its name written oddly, a value it never makes. Then the fast path refuses them too, so a
        # grant is never filed under one cookie (or none) while the bridge authenticated another.
        "    map $http_cookie $bridge_session {",
        '        default "";',
        f'        "~{cookie["session"]}" $1;',
        "    }",
        "    map $http_cookie $bridge_cookie_refused {",
        "        default 0;",
        *(f'        "~{cookie[kind]}" 1;  # {kind}' for kind in ("odd", "twice", "unsound")),
        "    }",
        # No credential at all: nothing a grant may be filed under (every caller would share it).
        '    map "$bridge_session$http_authorization$http_x_api_key" $bridge_no_credential {',
        '        "" 1;',
        "        default 0;",
        "    }",
        *upstreams,
        "    server {",
        f"        listen {listen};",
        *tls_listen,
        "        location / {",
        "            proxy_pass http://bridge;",
        *(f"            {line}" for line in to_bridge + streamed),
        "        }",
        "        # WADO-RS retrieves: the study granted by the bridge, then straight to its archive.",
        f'        location ~ "^/dicom-web/({RETRIEVE})$" {{',
        "            set $bridge_path $1;",
        "            set $bridge_study $2;",
        "            set $bridge_series $3;",
        f"            error_page {handed_on} = @bridge;",
        "            if ($request_method !~ ^(GET|HEAD)$) { return 418; }",
        "            if ($bridge_cookie_refused) { return 401; }  # the bridge refuses them, saying why",
        "            if ($bridge_no_credential) { return 401; }  # the bridge answers: never a grant",
        # The raw path must be the one matched: no escapes, dot segments or doubled slashes.
        f'            if ($request_uri !~ "^/dicom-web/{RETRIEVE}(?:\\?|$)") {{ return 418; }}',
        f"            auth_request {GRANT_PATH};",
        *(
            f"            auth_request_set ${_variable(header)} $upstream_http_{_variable(header)};"
            for header in (FORWARD_HEADER, HOST_HEADER, NAME_HEADER, AUTHORIZATION_HEADER)
        ),
        *(f"            {line}" for line in to_archive),
        "        }",
        f"        location = {GRANT_PATH} {{",
        "            internal;",
        f"            proxy_pass http://bridge{GRANT_PATH};",
        "            proxy_pass_request_body off;",
        '            proxy_set_header Content-Length "";',
        f"            proxy_set_header {PATH_HEADER} $bridge_path;",
        *(f"            {line}" for line in to_bridge),
        f"            proxy_read_timeout {deadline};",
        "            proxy_cache bridge_grants;  # needs proxy_buffering, on by default",
        # Keyed by the study and series and the very credentials the bridge reads: the one session
        # cookie as the bridge reads it (it refuses any other), the first Authorization and X-API-Key
        # headers (its too); never all three empty (see $bridge_no_credential).
        "            proxy_cache_key "
        '"$bridge_study $bridge_series $bridge_session $http_authorization $http_x_api_key";',
        "            proxy_cache_valid 200 0s;  # the bridge's X-Accel-Expires says how long a grant holds",
        "            proxy_cache_lock on;",
        "        }",
        "        location @bridge {",
        "            proxy_pass http://bridge;",
        *(f"            {line}" for line in to_bridge + streamed),
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)
