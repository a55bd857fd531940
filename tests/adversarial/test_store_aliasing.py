"""A store that answers with another secret than the one asked for, through the real CLI.

Secrets Manager reads an ARN ending in ``-`` and six characters as a complete ARN.
With a partial-ARN template ``arn:...:secret:adv-alias/{client_id}``, the client ID
``alice-<alice's suffix>`` is valid and names alice's secret. moto's server mode does
the same (and answers an ARN of another region or account with its own secret), so
those cases run against moto. What moto never does (answer a name with another
secret, leave out Name or ARN, answer another version stage) a hostile
``FakeSecretsManager`` does.

Every refusal is ``403 no_credential``, nothing reaches the upstream, one warning
line tells the operator, and no secret value appears in a response or a log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.aws import AWS_ENV
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import assert_alive, assert_no_secret, exchange, get, metric, running_sidecar
from tests.support.store_faults import ACCOUNT, FakeSecretsManager, arn, put_secret, secrets_manager
from tests.support.upstream import EchoUpstream

FETCHES = "sidecar_secret_fetch_duration_seconds_count"
REFUSED = "secret store answered with another secret than asked for"
SECRETS: list[str] = []


def _secret(label: str) -> str:
    value = make_secret(label)
    SECRETS.append(value)
    return value


def _config(endpoint: str, echo: EchoUpstream, templates: dict[str, str]) -> dict[str, Any]:
    return {
        "secrets": {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": endpoint, "timeout_seconds": 2}},
        "upstreams": {
            name: {"url": f"{echo.url}/{name}/status/200", "secret": template, "inject": {"query": "apiKey"},
                   "allow_private": True}
            for name, template in templates.items()
        },
    }


def _call(sc: SidecarProcess, upstream: str, client: str) -> Any:
    ex = exchange(sc.url, get(f"/{upstream}", client), timeout=10)
    assert_no_secret([ex.raw], *SECRETS)
    return ex.first


def _refusals(sc: SidecarProcess, secret_id: str) -> list[dict[str, Any]]:
    return [line for line in sc.lines() if REFUSED in str(line.get("message")) and line.get("secret_id") == secret_id]


def _assert_refused(sc: SidecarProcess, echo: EchoUpstream, upstream: str, client: str, secret_id: str, why: str) -> None:
    """403 no_credential, nothing sent upstream, and one warning saying why."""
    echo.reset()
    r = _call(sc, upstream, client)
    assert r.status == 403 and r.sidecar_error == "no_credential", r.text()
    assert echo.received == [], f"the upstream got {echo.received[0].query!r}"
    line = sc.wait_for_line(lambda line: REFUSED in str(line.get("message")) and line.get("secret_id") == secret_id)
    assert line["level"] == "warning" and line["mismatch"] == why, line
    access = sc.wait_for_line(lambda line: line.get("event") == "request" and line.get("client_id") == client)
    assert access["reason"] == "secret_mismatch", access


# ================================================================== moto: AWS's own partial-ARN reading

MOTO_PREFIX = "adv-alias/"
MOTO_KEYS: dict[str, str] = {}
MOTO_ARNS: dict[str, str] = {}
PARTIAL = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:{MOTO_PREFIX}"


@pytest.fixture(scope="module")
def moto_seeded(moto_endpoint: str) -> dict[str, str]:
    sm = secrets_manager(moto_endpoint)
    for who in ("alice", "bob"):
        MOTO_KEYS[who] = _secret(f"alias-moto-{who}")
        MOTO_ARNS[who] = put_secret(sm, MOTO_PREFIX + who, SecretString=MOTO_KEYS[who])
    return MOTO_ARNS


@pytest.fixture(scope="module")
def moto_sc(
    tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str, _echo_server: EchoUpstream,
    moto_seeded: dict[str, str],
) -> Iterator[SidecarProcess]:
    templates = {
        "byarn": PARTIAL + "{client_id}",
        "byname": MOTO_PREFIX + "{client_id}",
        "west": f"arn:aws:secretsmanager:us-west-2:{ACCOUNT}:secret:{MOTO_PREFIX}{{client_id}}",
        "foreign": f"arn:aws:secretsmanager:us-east-1:210987654321:secret:{MOTO_PREFIX}{{client_id}}",
    }
    with running_sidecar(
        _config(moto_endpoint, _echo_server, templates), tmp_path_factory.mktemp("alias-moto"), env=AWS_ENV,
        name="alias-moto",
    ) as proc:
        yield proc


def test_partial_arn_template_client_with_alices_suffix_gets_no_credential(
    moto_sc: SidecarProcess, moto_endpoint: str, _echo_server: EchoUpstream
) -> None:
    suffix = MOTO_ARNS["alice"].rsplit("-", 1)[1]
    client = f"alice-{suffix}"
    secret_id = PARTIAL + client
    # The premise: moto, like AWS, answers this id with alice's secret.
    assert secrets_manager(moto_endpoint).get_secret_value(SecretId=secret_id)["Name"] == MOTO_PREFIX + "alice"
    _assert_refused(moto_sc, _echo_server, "byarn", client, secret_id, "suffix")
    # Negatively cached like a missing secret: no second store call, no second warning.
    before = metric(moto_sc, FETCHES, {"backend": "aws"})
    again = _call(moto_sc, "byarn", client)
    assert again.status == 403 and again.sidecar_error == "no_credential", again.text()
    assert metric(moto_sc, FETCHES, {"backend": "aws"}) == before
    assert len(_refusals(moto_sc, secret_id)) == 1
    # The app cannot tell "another tenant's secret is there" from "nothing here".
    missing = _call(moto_sc, "byarn", "alice-zzzzzz")
    assert missing.status == again.status and missing.body == again.body


@pytest.mark.parametrize(("upstream", "asked"), [
    ("west", f"arn:aws:secretsmanager:us-west-2:{ACCOUNT}:secret:{MOTO_PREFIX}alice"),
    ("foreign", f"arn:aws:secretsmanager:us-east-1:210987654321:secret:{MOTO_PREFIX}alice"),
])
def test_an_arn_answered_from_another_region_or_account_is_refused(
    moto_sc: SidecarProcess, _echo_server: EchoUpstream, upstream: str, asked: str
) -> None:
    """moto answers an ARN of another region or account with its own secret of that name."""
    _assert_refused(moto_sc, _echo_server, upstream, "alice", asked, "arn")


def test_alice_still_gets_her_key_through_an_arn_template(moto_sc: SidecarProcess, _echo_server: EchoUpstream) -> None:
    """The control: the check refuses aliases, not the secret asked for."""
    for upstream in ("byarn", "byname"):
        for who in ("alice", "bob"):
            _echo_server.reset()
            r = _call(moto_sc, upstream, who)
            assert r.status == 200, r.text()
            assert _echo_server.last().query == f"apiKey={MOTO_KEYS[who]}"


def test_moto_sidecar_log_is_clean(moto_sc: SidecarProcess) -> None:
    assert_alive(moto_sc)
    assert_no_secret([moto_sc.output()], *SECRETS)


# ================================================================== a hostile store

FAKE_PREFIX = "adv-fake/"
FAKE_ARN = arn(FAKE_PREFIX, "")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSecretsManager]:
    f = FakeSecretsManager().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def fake_sc(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeSecretsManager, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    templates = {"byname": FAKE_PREFIX + "{client_id}", "byarn": FAKE_ARN + "{client_id}"}
    with running_sidecar(
        _config(fake.url, _echo_server, templates), tmp_path_factory.mktemp("alias-fake"), env=AWS_ENV,
        name="alias-fake",
    ) as proc:
        yield proc


# (case, the secret that exists, the client asking, upstream, the store answers that secret
# for the client's id (an alias), answer faults, the mismatch the sidecar logs). Each case has
# its own secret, so no case meets another's negative cache entry.
HOSTILE: list[tuple[str, str, str, str, bool, str, str]] = [
    ("name-suffix-echoed", "v1", "v1-AbCdEf", "byname", True, "echo-name", "arn"),
    ("name-suffix-honest", "v2", "v2-AbCdEf", "byname", True, "", "name"),
    ("other-secret-arn", "v3", "mallory3", "byarn", True, "", "name"),
    ("other-secret-name", "v4", "mallory4", "byname", True, "", "name"),
    ("no-name", "v5", "mallory5", "byname", True, "no-name", "unnamed"),
    ("no-arn", "v6", "mallory6", "byname", True, "echo-name no-arn", "unnamed"),
    ("no-name-no-arn-arn", "v7", "mallory7", "byarn", True, "no-name no-arn", "unnamed"),
    ("other-account-arn", "v8", "v8", "byarn", False, "other-account", "arn"),
    ("other-region-arn", "v9", "v9", "byarn", False, "other-region", "arn"),
    ("other-region-name", "v10", "v10", "byname", False, "other-region", "arn"),
    ("stage-name", "v11", "v11", "byname", False, "stage", "version_stage"),
    ("stage-arn", "v12", "v12", "byarn", False, "stage", "version_stage"),
    ("case-arn", "v13", "V13", "byarn", True, "", "name"),
    ("case-name", "v14", "V14", "byname", True, "", "name"),
    ("case-name-echoed", "v15", "V15", "byname", True, "echo-name", "arn"),
    ("trailing-dot-arn", "v16", "v16.", "byarn", True, "", "name"),
    ("trailing-hyphen-arn", "v17", "v17-", "byarn", True, "", "name"),
    ("trailing-equals-name-echoed", "v18", "v18=", "byname", True, "echo-name", "arn"),
]


@pytest.mark.parametrize(
    ("victim", "client", "upstream", "alias", "answer", "why"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE],
)
def test_a_store_answering_with_another_secret_gives_no_credential(
    fake_sc: SidecarProcess, fake: FakeSecretsManager, _echo_server: EchoUpstream,
    victim: str, client: str, upstream: str, alias: bool, answer: str, why: str,
) -> None:
    name = FAKE_PREFIX + victim
    fake.values[name] = _secret(f"alias-{victim}")
    asked = (FAKE_ARN if upstream == "byarn" else FAKE_PREFIX) + client
    if alias:
        fake.aliases[asked] = name
    fake.faults[asked] = answer
    _assert_refused(fake_sc, _echo_server, upstream, client, asked, why)
    assert fake.hits[asked] == 1


def test_honest_answers_pass_the_check(fake_sc: SidecarProcess, fake: FakeSecretsManager, _echo_server: EchoUpstream) -> None:
    """The control: the fake's honest answers (a name; a partial ARN) are injected."""
    key = fake.values[FAKE_PREFIX + "carol"] = _secret("alias-carol")
    for upstream in ("byname", "byarn"):
        _echo_server.reset()
        r = _call(fake_sc, upstream, "carol")
        assert r.status == 200, r.text()
        assert _echo_server.last().query == f"apiKey={key}"


def test_fake_sidecar_log_is_clean(fake_sc: SidecarProcess) -> None:
    assert_alive(fake_sc)
    assert_no_secret([fake_sc.output()], *SECRETS)
