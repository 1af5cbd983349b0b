"""How the bridge reads its cookies from Cookie headers (bridge/cookies.py): one value or a refusal."""

from __future__ import annotations

import pytest

from bridge.cookies import CookieReading, read, spellings

REAL = "Zm9vYmFyLXNlc3Npb24taWQtMTIzNDU2Nzg5MA"
NAME = "bridge_session"
HOST = "__Host-bridge_session"


@pytest.mark.parametrize(
    ("headers", "name", "value"),
    [
        ([f"{NAME}={REAL}"], NAME, REAL),
        ([f"theme=dark; {NAME}={REAL}; lang=en"], NAME, REAL),
        ([f"theme=dark;{NAME}={REAL}"], NAME, REAL),  # no space after ';': still one plain reading
        (["theme=dark", f"{NAME}={REAL}"], NAME, REAL),  # several Cookie headers
        ([f"{NAME}={REAL};"], NAME, REAL),
        ([f"{HOST}={REAL}"], HOST, REAL),
        ([f"{NAME}=other; {HOST}={REAL}"], HOST, REAL),  # the other name, written plainly, is not ours
        ([f"x{NAME}={REAL}; {NAME}x={REAL}"], NAME, None),  # other cookies' names
        (["theme=dark"], NAME, None),
        ([], NAME, None),
        ([NAME], NAME, None),  # no '=': not a pair
    ],
)
def test_a_cookie_written_as_a_browser_writes_it_is_read(
    headers: list[str], name: str, value: str | None
) -> None:
    assert read(headers, name) == CookieReading(value)


@pytest.mark.parametrize(
    ("headers", "name", "reason"),
    [
        ([f"{NAME}=alias; {NAME}={REAL}"], NAME, "more than one"),
        ([f"{NAME}=alias", f"{NAME}={REAL}"], NAME, "more than one"),
        ([f"{NAME} ={REAL}"], NAME, "written with spaces"),
        ([f"{NAME}\t={REAL}"], NAME, "written with spaces"),
        ([f"\x1f{NAME}={REAL}"], NAME, "written with spaces"),
        ([f"\xa0{NAME}={REAL}"], NAME, "written with spaces"),
        ([f"bridge_ses sion={REAL}"], NAME, "written with spaces"),
        ([f"a=1;  {NAME}={REAL}"], NAME, "written with spaces"),  # two spaces after ';'
        ([f"a=1;\t{NAME}={REAL}"], NAME, "written with spaces"),
        ([f" {NAME}={REAL}"], NAME, "written with spaces"),  # a header begins with the name
        ([f"{NAME}=alias; {NAME} ={REAL}"], NAME, "written with spaces"),
        ([f"{HOST} ={REAL}"], NAME, "written with spaces"),  # either name, whichever is in use
        ([f"{NAME}\x7f={REAL}; {HOST}={REAL}"], HOST, "written with spaces"),
        ([f'{NAME}="{REAL}"'], NAME, "not one the bridge set"),
        ([f"{NAME}={REAL} ; a=1"], NAME, "not one the bridge set"),
        ([f"{NAME}= {REAL}"], NAME, "not one the bridge set"),
        ([f"{NAME}="], NAME, "not one the bridge set"),
        ([f"{NAME}={'a' * 129}"], NAME, "not one the bridge set"),
    ],
)
def test_a_cookie_written_any_other_way_is_refused_never_trimmed_or_picked(
    headers: list[str], name: str, reason: str
) -> None:
    reading = read(headers, name)
    assert reading.value is None
    assert reading.refused is not None and reason in reading.refused
    assert REAL not in reading.refused  # a refusal never repeats the credential


def test_a_cookie_has_a_plain_and_a_host_prefixed_spelling() -> None:
    assert spellings(NAME) == spellings(HOST) == (NAME, HOST)
