"""The gateway front's grants (GET /gateway/front/grant) and the nginx configuration that asks for them."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import certifi
import hypothesis
import pytest
from hypothesis import strategies as st
from typer.testing import CliRunner

from bridge import cookies
from bridge.api.routes.gateway import grant_seconds
from bridge.cli import app as cli
from bridge.config import Settings
from bridge.errors import ConfigurationError
from bridge.gateway import front
from bridge.gateway.paths import parse
from tests.unit.gateway.test_gateway import (
    ARCHIVE_PASSWORD,
    ARCHIVE_USER,
    PATIENT_1,
    UID_1,
    UID_2,
    UID_3,
    WITHDRAWN_SOP,
    World,
    bearer,
    gateway,
    rejected,  # noqa: F401 (a fixture)
    token,
)
from tests.unit.settings_factory import make_settings

pytestmark = pytest.mark.anyio

SECRET = "front-secret-4b8f0e2a9c7d1e3f5a6b"
INSTANCE = f"studies/{UID_1}/series/1.2.3/instances/4.5.6"


def _asking(path: str, secret: str = SECRET, **headers: str) -> dict[str, str]:
    return {front.SECRET_HEADER: secret, front.PATH_HEADER: path, **headers}


async def test_a_granted_study_says_where_to_send_it_with_the_bridges_credentials(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, gateway_front_secret=SECRET) as api:
        answer = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **bearer(**PATIENT_1)))
    assert answer.status_code == 200
    assert answer.headers[front.FORWARD_HEADER] == "https://bridge_archive_0/dicom-web"
    assert answer.headers[front.HOST_HEADER] == "pacs.example"
    assert answer.headers[front.NAME_HEADER] == "pacs.example"
    expected = base64.b64encode(f"{ARCHIVE_USER}:{ARCHIVE_PASSWORD}".encode()).decode()
    assert answer.headers[front.AUTHORIZATION_HEADER] == f"Basic {expected}"
    assert answer.headers["x-accel-expires"] == "5"  # BRIDGE_SESSION_CACHE_TTL's default
    assert world.archive_requests == []  # the front asks the archive, not the bridge


async def test_a_grant_is_kept_no_longer_than_the_token_lasts(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, gateway_front_secret=SECRET) as api:
        short = {"Authorization": f"Bearer {token(lifetime=3, **PATIENT_1)}"}
        answer = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **short))
    assert answer.status_code == 200 and int(answer.headers["x-accel-expires"]) <= 3
    async with gateway(tmp_path, world, gateway_front_secret=SECRET, session_cache_ttl=0) as api:
        never = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **bearer(**PATIENT_1)))
    assert never.headers["x-accel-expires"] == "0"  # nginx keeps nothing: every retrieve is asked


def test_grant_seconds() -> None:
    assert grant_seconds(5.0, None, 1000.0) == 5
    assert grant_seconds(5.0, 1002.5, 1000.0) == 2
    assert grant_seconds(5.0, 999.0, 1000.0) == 0
    assert grant_seconds(0.0, None, 1000.0) == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda: bearer(patient="p2", scope="patient/ImagingStudy.read"), id="another patient"),
        pytest.param(dict, id="no credentials"),
        pytest.param(lambda: {"X-API-Key": "wrong-key"}, id="a wrong key"),
        pytest.param(lambda: {"Authorization": f"Bearer {token(lifetime=-60, **PATIENT_1)}"}, id="expired"),
    ],
)
async def test_anything_but_a_grant_is_403_and_left_to_the_gateway_to_answer_and_audit(
    tmp_path: Path, headers: object
) -> None:
    world = World()
    async with gateway(tmp_path, world, gateway_front_secret=SECRET, audit="fhir") as api:
        answer = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **headers()))  # type: ignore[operator]
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    assert answer.status_code == 403
    assert answer.content == b""
    assert not any(h.startswith("x-bridge-") for h in answer.headers)
    assert world.audit_bundles == []  # the gateway audits the refusal when it answers the request
    assert world.archive_requests == []


@pytest.mark.parametrize(
    "path",
    [
        f"studies/{UID_1}/series",  # a search: its answer is the archive's, unfiltered by nothing here
        "studies",
        f"studies/{UID_1}/series/1.2/instances/3.4/bulk/7FE00010",  # bulk data: the gateway's own path
        f"studies/{UID_1}/../{UID_2}",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/1%2C2",
        "",
    ],
)
async def test_only_plain_retrieves_are_granted(tmp_path: Path, path: str) -> None:
    async with gateway(tmp_path, World(), gateway_front_secret=SECRET) as api:
        answer = await api.get(front.GRANT_PATH, headers=_asking(path, **{"X-API-Key": "machine-key-1"}))
    assert answer.status_code == 403


async def test_without_the_secret_there_is_no_such_route(tmp_path: Path) -> None:
    key = {"X-API-Key": "machine-key-1"}
    async with gateway(tmp_path, World(), gateway_front_secret=SECRET) as api:
        wrong = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, secret=SECRET[:-1] + "x", **key))
        missing = await api.get(front.GRANT_PATH, headers={front.PATH_HEADER: INSTANCE, **key})
    async with gateway(tmp_path, World()) as api:
        unconfigured = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **key))
    assert wrong.status_code == missing.status_code == unconfigured.status_code == 404
    assert front.AUTHORIZATION_HEADER not in wrong.headers


async def test_a_grant_is_one_audit_event_per_caller_study_and_window(tmp_path: Path) -> None:
    world = World()
    async with gateway(
        tmp_path, world, gateway_front_secret=SECRET, audit="fhir", audit_flush_interval=3600
    ) as api:
        for _ in range(3):  # the front asks again each time its grant runs out
            granted = await api.get(front.GRANT_PATH, headers=_asking(INSTANCE, **bearer(**PATIENT_1)))
            assert granted.status_code == 200
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    assert len(events) == 1
    assert events[0]["outcome"] == "0" and events[0]["subtype"][1]["code"] == "image-read"
    assert events[0]["entity"][1]["what"]["reference"] == "ImagingStudy/s1"


async def test_the_audit_trail_names_the_caller_the_front_saw_and_never_one_a_caller_wrote(
    tmp_path: Path,
) -> None:
    caller, forged = "198.51.100.23", "203.0.113.7"
    world = World()
    async with gateway(tmp_path, world, gateway_front_secret=SECRET, audit="fhir") as api:
        # The front's question: its secret, and the address nginx saw last in X-Forwarded-For.
        granted = await api.get(
            front.GRANT_PATH,
            headers=_asking(INSTANCE, **bearer(**PATIENT_1), **{"X-Forwarded-For": f"{forged}, {caller}"}),
        )
        # A local caller without the secret, writing the header itself: refused, at its own address.
        other = bearer(patient="p2", scope="patient/ImagingStudy.read")
        refused = await api.get(
            f"/dicom-web/studies/{UID_1}/metadata", headers={**other, "X-Forwarded-For": forged}
        )
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    assert (granted.status_code, refused.status_code) == (200, 403)
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    addresses = {e["outcome"]: e["agent"][0]["network"]["address"] for e in events}
    assert addresses == {"0": caller, "4": "127.0.0.1"}  # httpx's ASGI transport connects as 127.0.0.1


# ---------------------------------------------------------------- the path grammar of the fast path


@pytest.mark.parametrize(
    "path",
    [
        f"studies/{UID_1}",
        f"studies/{UID_1}/metadata",
        f"studies/{UID_1}/rendered",
        f"studies/{UID_1}/series/1.2",
        f"studies/{UID_1}/series/1.2/thumbnail",
        f"studies/{UID_1}/series/1.2/instances/3.4",
        f"studies/{UID_1}/series/1.2/instances/3.4/metadata",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/1,2,3",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/7/rendered",
    ],
)
def test_the_fast_path_takes_retrieves_the_gateway_serves(path: str) -> None:
    assert front.is_fast_path(path)
    route = parse(path)
    assert route is not None and route.kind == "retrieve" and route.study_uid == UID_1


@pytest.mark.parametrize(
    "path",
    [
        "studies",
        f"studies/{UID_1}/series",
        f"studies/{UID_1}/series/1.2/instances",
        f"studies/{UID_1}/series/1.2/instances/3.4/bulk/7FE00010",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/1/metadata",
        f"studies/{UID_1}/series/../instances",
        f"studies/{UID_1}/./metadata",
        f"studies/{UID_1}//metadata",
        f"studies/{UID_1}/metadata/",
        "studies/.1.2/metadata",
        "studies/1.2.3/other",
        f"studies/{'1' * 65}",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/1%2C2",
    ],
)
def test_the_fast_path_leaves_everything_else_to_the_gateway(path: str) -> None:
    assert not front.is_fast_path(path)


# ---------------------------------------------------------------- the nginx configuration


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "dicomweb_url": "http://pacs.example:8042/dicom-web",
        "fhir_url": "https://fhir.example/R4",
        "gateway_front_secret": SECRET,
    }
    return make_settings(**(values | overrides))


def test_the_configuration_routes_retrieves_to_the_archive_and_the_rest_to_the_bridge(tmp_path: Path) -> None:
    options = front.FrontOptions(listen="127.0.0.1:9443", bridge="http://127.0.0.1:8000", state_dir=tmp_path)
    text = front.nginx_config(_settings(), options)
    assert "listen 127.0.0.1:9443;" in text
    assert "upstream bridge { server 127.0.0.1:8000; keepalive 32; }" in text
    assert "upstream bridge_archive_0 { server pacs.example:8042; keepalive 32; }" in text
    assert f'proxy_set_header {front.SECRET_HEADER} "{SECRET}";' in text
    assert f"location = {front.GRANT_PATH} {{\n            internal;" in text
    assert "proxy_pass_request_headers off;" in text  # the caller's cookies and tokens stay at the front
    assert "access_log off;" in text and "error_log stderr crit;" in text
    assert f"proxy_cache_path {tmp_path / 'grants'} " in text
    assert "proxy_ssl" not in text  # no archive over https


def test_every_error_of_the_archive_is_answered_by_the_bridge_never_passed_on(tmp_path: Path) -> None:
    """The archive's error body may tell another patient's UID from an unknown one (or name it)."""
    text = front.nginx_config(_settings(), front.FrontOptions(state_dir=tmp_path))
    [line] = [line.strip() for line in text.splitlines() if line.strip().startswith("error_page ")]
    assert line.endswith(" = @bridge;")
    handed_on = {int(code) for code in line.split()[1:-2]}
    # Every status nginx can intercept: 499 is nginx's own ("client closed"), refused in error_page.
    assert handed_on == set(range(400, 600)) - {499}
    assert "proxy_intercept_errors on;" in text


def test_every_request_the_front_hands_the_bridge_carries_its_secret(tmp_path: Path) -> None:
    """The bridge believes the front's X-Forwarded-For for its secret (bridge/api/forwarded.py)."""
    text = front.nginx_config(_settings(), front.FrontOptions(state_dir=tmp_path))
    to_bridge = [block for block in text.split("location ")[1:] if "proxy_pass http://bridge" in block]
    assert len(to_bridge) == 3  # everything else, the grant, and what the fast path hands on
    for block in to_bridge:
        assert block.count(f'proxy_set_header {front.SECRET_HEADER} "{SECRET}";') == 1
        assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in block
    archive = next(block for block in text.split("location ")[1:] if "$x_bridge_forward" in block)
    assert SECRET not in archive and "proxy_pass_request_headers off;" in archive  # never to the archive


def test_archives_over_https_are_verified_with_their_ca_bundle(tmp_path: Path) -> None:
    ca = Path(certifi.where())
    settings = _settings(dicomweb_url="https://pacs.example/dicom-web", dicomweb_ca_bundle=str(ca))
    text = front.nginx_config(settings, front.FrontOptions(state_dir=tmp_path))
    assert "upstream bridge_archive_0 { server pacs.example:443; keepalive 32; }" in text
    assert "proxy_ssl_verify on;" in text and f'proxy_ssl_trusted_certificate "{ca}";' in text
    assert "proxy_ssl_name $x_bridge_archive_name;" in text


def test_each_source_has_its_upstream_in_settings_order(tmp_path: Path) -> None:
    settings = _settings(
        sources=[
            {"name": "a", "dicomweb": {"url": "http://pacs-a.example/rs"}},
            {"name": "b", "dicomweb": {"url": "http://pacs-b.example:8080/dicom-web"}},
        ]
    )
    text = front.nginx_config(settings, front.FrontOptions(state_dir=tmp_path))
    assert "upstream bridge_archive_0 { server pacs-a.example:80;" in text
    assert "upstream bridge_archive_1 { server pacs-b.example:8080;" in text


@pytest.mark.parametrize(
    ("overrides", "options", "named"),
    [
        ({"gateway_front_secret": None}, {}, "BRIDGE_GATEWAY_FRONT_SECRET"),
        ({}, {"listen": "127.0.0.1:80; evil"}, "--listen"),
        ({}, {"bridge": "http://127.0.0.1:8000/api"}, "--bridge"),
        ({}, {"certificate": Path("/tls/front.pem")}, "--certificate"),
        ({"gateway_front_secret": SECRET + '";'}, {}, "BRIDGE_GATEWAY_FRONT_SECRET"),
    ],
)
def test_a_configuration_that_cannot_be_written_names_the_setting(
    tmp_path: Path, overrides: dict[str, object], options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        front.nginx_config(_settings(**overrides), front.FrontOptions(state_dir=tmp_path, **options))  # type: ignore[arg-type]


def test_archives_over_https_with_different_tls_set_ups_are_refused(tmp_path: Path) -> None:
    settings = _settings(
        sources=[
            {"name": "a", "dicomweb": {"url": "https://pacs-a.example/rs", "verify_tls": False}},
            {"name": "b", "dicomweb": {"url": "https://pacs-b.example/rs"}},
        ]
    )
    with pytest.raises(ConfigurationError, match="one TLS set-up"):
        front.nginx_config(settings, front.FrontOptions(state_dir=tmp_path))


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"gateway_front_secret": "short"}, "at least 32"),
        ({"gateway_front_secret": SECRET, "gateway": False}, "BRIDGE_GATEWAY=true"),
    ],
)
def test_a_bad_front_secret_stops_start_up_naming_it(values: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        _settings(**values)


def test_the_front_secret_may_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "front.secret"
    path.write_text(SECRET + "\n")
    settings = _settings(gateway_front_secret=None, gateway_front_secret_file=str(path))
    assert settings.gateway.secret is not None and settings.gateway.secret.get_secret_value() == SECRET


def test_front_config_writes_a_file_only_its_owner_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", "http://127.0.0.1:8042/dicom-web")
    monkeypatch.setenv("BRIDGE_FHIR_URL", "http://127.0.0.1:8103/fhir/R4")
    monkeypatch.setenv("BRIDGE_GATEWAY_FRONT_SECRET", SECRET)
    output = tmp_path / "front.conf"
    result = CliRunner().invoke(cli, ["front-config", "--output", str(output), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert output.stat().st_mode & 0o777 == 0o600
    assert SECRET in output.read_text() and SECRET not in result.stdout
    monkeypatch.delenv("BRIDGE_GATEWAY_FRONT_SECRET")
    refused = CliRunner().invoke(cli, ["front-config"])
    assert refused.exit_code == 2 and "BRIDGE_GATEWAY_FRONT_SECRET" in " ".join(refused.stderr.split())


@pytest.mark.parametrize(
    ("path", "granted"),
    [
        (INSTANCE, True),
        (f"studies/{UID_1}/series/1.2/rendered", True),
        (f"studies/{UID_1}/series/9.9/instances/4.5.6", False),  # not listed: maybe another patient's
        (f"studies/{UID_1}/series/1.2.3/metadata", True),
        (f"studies/{UID_3}/series/1.2/instances/4.5.6", False),  # withdrawn
    ],
)
async def test_a_patient_limited_caller_is_granted_only_retrieves_in_the_series_its_study_lists(
    tmp_path: Path, path: str, granted: bool
) -> None:
    async with gateway(tmp_path, World(), gateway_front_secret=SECRET) as api:
        answer = await api.get(front.GRANT_PATH, headers=_asking(path, **bearer(**PATIENT_1)))
        machine = await api.get(front.GRANT_PATH, headers=_asking(path, **{"X-API-Key": "machine-key-1"}))
    assert answer.status_code == (200 if granted else 403)
    # Unlisted series are refused to every caller (rejected images are left out of the listing).
    assert machine.status_code == (403 if UID_3 in path or "9.9" in path else 200)


def test_grants_are_kept_per_study_and_series(tmp_path: Path) -> None:
    text = front.nginx_config(_settings(), front.FrontOptions(state_dir=tmp_path))
    assert "set $bridge_series $3;" in text
    assert 'proxy_cache_key "$bridge_study $bridge_series ' in text


@pytest.mark.parametrize(
    "path", [f"studies/{UID_1}/metadata", f"studies/{UID_1}", f"studies/{UID_1}/rendered"]
)
async def test_a_study_level_retrieve_is_granted_only_while_the_archive_holds_no_unlisted_series(
    tmp_path: Path, path: str
) -> None:
    def rows(*series: str) -> list[dict[str, object]]:
        return [{"0020000E": {"vr": "UI", "Value": [uid]}} for uid in series]

    world = World(json_paths={f"studies/{UID_1}/series": rows("1.2", "1.2.3")})
    async with gateway(tmp_path, world, gateway_front_secret=SECRET) as api:
        clean = await api.get(front.GRANT_PATH, headers=_asking(path, **bearer(**PATIENT_1)))
        world.json_paths[f"studies/{UID_1}/series"] = rows("1.2", "1.2.3", "9.9")  # another patient's
        mixed = await api.get(front.GRANT_PATH, headers=_asking(path, **bearer(**PATIENT_1)))
    assert (clean.status_code, mixed.status_code) == (200, 403)


@pytest.mark.parametrize(
    ("public_url", "cookie"),
    [("http://127.0.0.1:8080", "bridge_session"), ("https://bridge.example", r"__Host\-bridge_session")],
)
def test_the_grant_is_keyed_by_the_bridges_own_session_cookie_and_two_are_refused(
    tmp_path: Path, public_url: str, cookie: str
) -> None:
    settings = _settings(
        public_url=public_url, oidc_issuer="https://idp.example", oidc_client_id="bridge-web"
    )
    text = front.nginx_config(settings, front.FrontOptions(state_dir=tmp_path))
    assert f'"~(?:^|; ?){cookie}=([A-Za-z0-9_-]{{1,128}})(?:;|$)" $1;' in text  # the bridge's cookie, by name
    assert "$cookie_" not in text  # never nginx's own pick of the first of several
    assert "if ($bridge_cookie_refused) { return 401; }" in text
    assert '"$bridge_study $bridge_series $bridge_session $http_authorization $http_x_api_key";' in text


def test_a_retrieve_without_any_credential_is_never_granted_at_the_front(tmp_path: Path) -> None:
    """No cookie, token or key: the bridge answers it (401, or anonymous access if configured); a grant
    filed under an empty key would serve every caller without credentials."""
    text = front.nginx_config(_settings(), front.FrontOptions(state_dir=tmp_path))
    assert '    map "$bridge_session$http_authorization$http_x_api_key" $bridge_no_credential {\n' in text
    assert '        "" 1;\n        default 0;\n' in text
    # Checked before the grant is asked: 401 hands the request to the bridge (error_page).
    assert text.index("if ($bridge_no_credential) { return 401; }") < text.index("auth_request ")


@pytest.mark.usefixtures("rejected")
@pytest.mark.parametrize(
    "path",
    [INSTANCE, f"studies/{UID_1}/series/1.2/instances/{WITHDRAWN_SOP}/frames/1", f"studies/{UID_1}/metadata"],
)
async def test_no_retrieve_of_a_study_with_withdrawn_instances_goes_straight_to_the_archive(
    tmp_path: Path, path: str
) -> None:
    # Grants are kept per series, not per instance: the gateway answers them all, rejected ones refused.
    async with gateway(tmp_path, World(), gateway_front_secret=SECRET) as api:
        patient = await api.get(front.GRANT_PATH, headers=_asking(path, **bearer(**PATIENT_1)))
        machine = await api.get(front.GRANT_PATH, headers=_asking(path, **{"X-API-Key": "machine-key-1"}))
    assert (patient.status_code, machine.status_code) == (403, 403)


# ---------------------------------------------------------------- the session cookie, read alike by both

REAL = "Zm9vYmFyLXNlc3Npb24taWQtMTIzNDU2Nzg5MA"


def _unquoted(text: str) -> str:
    """An nginx quoted string's content as nginx reads it (its own escapes; any other backslash kept)."""
    escapes = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}
    return re.sub(r"\\([\"'\\trn])", lambda m: escapes[m.group(1)], text)


def _map(config: str, variable: str) -> list[tuple[re.Pattern[str], str]]:
    """The regular expressions of nginx's ``map $http_cookie $variable`` block, in order, and their values."""
    block = re.search(rf"map \$http_cookie \${variable} \{{\n(.*?)\n    \}}", config, re.S)
    assert block is not None, variable
    entries = re.findall(r'^\s*"~(.*)" (\S+);', block.group(1), re.M)
    return [(re.compile(_unquoted(regex)), value) for regex, value in entries]


class _Front:
    """The generated configuration's cookie maps, applied with Python's re as nginx applies them."""

    def __init__(self, public_url: str, tmp_path: Path) -> None:
        settings = _settings(public_url=public_url, oidc_issuer="https://idp.example", oidc_client_id="web")
        config = front.nginx_config(settings, front.FrontOptions(state_dir=tmp_path))
        self.session = _map(config, "bridge_session")
        self.refused = _map(config, "bridge_cookie_refused")
        assert len(self.session) == 1 and self.session[0][1] == "$1"
        assert [value for _, value in self.refused] == ["1", "1", "1"]

    def read(self, joined: str) -> tuple[bool, str]:
        """(whether the fast path refuses, the value of $bridge_session) for nginx's $http_cookie."""
        refused = any(regex.search(joined) for regex, _ in self.refused)
        found = self.session[0][0].search(joined)
        return refused, found.group(1) if found else ""


def _agree(reader: _Front, name: str, headers: list[str]) -> None:
    """The front and the bridge read these Cookie header values (as sent) alike.

    nginx drops a value's leading spaces and tabs and its trailing spaces; the bridge's HTTP parser
    (httptools or h11) drops leading and trailing spaces and tabs of what nginx passes on.
    """
    at_front = [h.lstrip(" \t").rstrip(" ") for h in headers]
    refused, keyed = reader.read("; ".join(at_front))
    reading = cookies.read([h.strip(" \t") for h in at_front], name)
    if reading.refused is not None:
        assert refused, (headers, reading.refused)  # the front refuses what the bridge refuses
        return
    # What the fast path files a grant under is what the bridge authenticated, or it hands it on.
    assert refused or keyed == (reading.value or ""), (headers, keyed, reading.value)
    if at_front == [h.strip(" \t") for h in at_front]:  # nothing trimmed: the very same reading
        assert not refused, headers


_ADVERSARIAL = [
    [f"bridge_session={REAL}"],
    [f"a=1; bridge_session={REAL}; b=2"],
    [f"a=1;bridge_session={REAL}"],
    ["a=1", f"bridge_session={REAL}"],
    [f"bridge_session =alias; bridge_session={REAL}"],
    [f"bridge_session ={REAL}"],
    [f"bridge_session\t={REAL}"],
    [f"\x1fbridge_session={REAL}"],
    [f"bridge_session\x1f={REAL}"],
    [f"\xa0bridge_session={REAL}"],
    [f"a=1;\tbridge_session={REAL}"],
    [f"a=1;  bridge_session={REAL}"],
    [f"a=1; \x0bbridge_session={REAL}"],
    [f"bri dge_session={REAL}"],
    [f"bridge_session=alias; bridge_session={REAL}"],
    ["bridge_session=alias", f"bridge_session={REAL}"],
    ["bridge_session=alias", f" bridge_session={REAL}"],
    [f"bridge_session={REAL}\t"],
    [f"bridge_session={REAL} "],
    [f"bridge_session={REAL} ; a=1"],
    [f'bridge_session="{REAL}"'],
    ["bridge_session="],
    ["bridge_session=; a=1"],
    [f"bridge_session={REAL}=x"],
    [f"xbridge_session={REAL}"],
    [f"__Host-bridge_session={REAL}"],
    [f"__Host-bridge_session ={REAL}; bridge_session={REAL}"],
    [f"__Host- bridge_session={REAL}"],
    [f"bridge_session={REAL}; __Host-bridge_session=alias"],
    [f"__Host-bridge_session=alias; __Host-bridge_session={REAL}"],
    [f"__Host-bridge_session\t={REAL}"],
    [f"Bridge_Session={REAL}"],
    [f"bridge_session={'a' * 129}"],
    ["", f"bridge_session={REAL}"],
    [f"bridge_session={REAL};;"],
]


@pytest.mark.parametrize(
    ("public_url", "name"),
    [("http://127.0.0.1:8080", "bridge_session"), ("https://bridge.example", "__Host-bridge_session")],
)
def test_the_front_keys_grants_on_the_very_cookie_the_bridge_authenticates(
    tmp_path: Path, public_url: str, name: str
) -> None:
    reader = _Front(public_url, tmp_path)
    for headers in _ADVERSARIAL:
        _agree(reader, name, headers)
    # The attack of the audit, spelled out: the bridge refuses, and so does the front.
    for odd in (f"{name} ={REAL}", f"{name}\t={REAL}", f"\x1f{name}={REAL}"):
        assert reader.read(odd)[0] and cookies.read([odd], name).refused


_NAME_PARTS = ["bridge_session", "__Host-bridge_session", "__Host-", "bridge", "_session", "other", "Bridge"]
_JUNK = [" ", "\t", "\x1f", "\x0b", "\x7f", "\xa0", ""]
_VALUES = [REAL, "alias", "", '"x"', "a b", "a=b", "a" * 129, REAL + " ", REAL + "\t"]
_SEPARATORS = ["; ", ";", ";  ", "; \t", ";\t", ";\x1f", "; ;"]


def _joined(parts: tuple[str, list[tuple[str, str]]]) -> str:
    first, more = parts
    return first + "".join(separator + pair for separator, pair in more)


# Pairs whose names are the session cookie's (or near it), spelled every way, in Cookie header values.
_PAIR = st.builds(
    lambda name, junk, value: "".join(j + part for j, part in name) + junk + "=" + value,
    st.lists(st.tuples(st.sampled_from(_JUNK), st.sampled_from(_NAME_PARTS)), min_size=1, max_size=2),
    st.sampled_from(_JUNK),
    st.sampled_from(_VALUES),
)
_COOKIE_HEADERS = st.lists(
    st.tuples(_PAIR, st.lists(st.tuples(st.sampled_from(_SEPARATORS), _PAIR), max_size=2)).map(_joined),
    min_size=1,
    max_size=3,
)
_ANY_TEXT = st.lists(st.text(alphabet="bridge_sion=; \t\x1f\xa0_Hot-xa", max_size=40), min_size=1, max_size=2)


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:8080", "https://bridge.example"])
def test_on_any_cookie_headers_the_front_and_the_bridge_read_the_session_alike(
    tmp_path: Path, public_url: str
) -> None:
    reader = _Front(public_url, tmp_path)
    name = "__Host-bridge_session" if public_url.startswith("https") else "bridge_session"

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(st.one_of(_COOKIE_HEADERS, _ANY_TEXT))
    def agree(headers: list[str]) -> None:
        _agree(reader, name, headers)

    agree()
