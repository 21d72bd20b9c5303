"""Alert messages: what they say, and that wire text arrives inert in Slack, e-mail and JSON.

The Slack checks go through apprise's real Slack plugin with its webhook base pointed at an
HTTP server on 127.0.0.1 (nothing is sent anywhere else: `loopback_only` refuses any other
address at the socket level).
"""

from __future__ import annotations

import base64
import json
import re

import apprise
import pytest
from alert_receivers import HttpReceiver, refuse_non_loopback

from sensor.records import Finding
from sensor.sinks.alert_config import AlertsConfig, AlertTarget, check_apprise_url
from sensor.sinks.alert_format import (
    alert_from_finding,
    clean,
    digest,
    first_sentence,
    guard_secrets,
    probe_alert,
    render_json,
    render_slack,
    render_text,
    slack_code,
)
from sensor.sinks.alerts import Target

HOSTILE = "*bold* <!channel> <http://evil|click> `tick` ~strike~ _it_ @here <@U0123> &amp;"
CONTROL = "alice\x1b[31m\r\nSubject: injected\x00\u202etxt.exe"
DESCRIPTION = ("A client sent an HTTP Basic credential (username and password, base64-encoded, "
               "not encrypted) to the registry over plain HTTP. Anyone on the path can read it.")


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if anything tries to connect anywhere but 127.0.0.1."""
    refuse_non_loopback(monkeypatch)


def finding(username=HOSTILE, repository="team/app", **kw) -> Finding:
    base = dict(
        ts=1_796_000_000.25, rule="plaintext-basic-auth", severity="high",
        title=f"Basic credential of {username} sent in clear text to 10.0.0.1:5000",
        src_ip="10.0.0.5", dest_ip="10.0.0.1", dest_port=5000, community_id="1:abc=",
        username=username, repository=repository, count=3,
        details={"method": "PUT", "uri": "/v2/team/app/manifests/1.0?token=SECRETQ",
                 "status": 201, "user_agent": "curl/8 <!everyone> *x*",
                 "authorization": "Basic YWxpY2U6UzNjcmV0LVBhNTV3b3JkIQ==",
                 "password": "S3cret-Pa55word!"},
        first_ts=1_796_000_000.0)
    base.update(kw)
    return Finding(**base)


def test_clean_escapes_control_characters_and_caps_length():
    text = clean(CONTROL)
    assert "\x1b" not in text and "\r" not in text and "\n" not in text and "\x00" not in text
    assert "\u202e" not in text
    assert text == "alice\\x1b[31m\\r\\nSubject: injected\\x00\\u202etxt.exe"
    long = clean("x" * 1000, cap=50)
    assert len(long) == 50 and long.endswith("…")


def test_first_sentence_of_a_description():
    assert first_sentence(DESCRIPTION) == (
        "A client sent an HTTP Basic credential (username and password, base64-encoded, not "
        "encrypted) to the registry over plain HTTP.")
    assert first_sentence("no full stop") == "no full stop"
    assert first_sentence(None) == ""


def test_slack_code_is_inert():
    code = slack_code(HOSTILE)
    assert code.startswith("`") and code.endswith("`")
    inner = code[1:-1]
    assert "`" not in inner  # nothing can close the code span early
    assert "<" not in inner and ">" not in inner  # no <!channel>, <@U…>, <url|text>
    assert "&lt;!channel&gt;" in inner and "&lt;@U0123&gt;" in inner
    assert "http://" not in inner and "hxxp://evil|click" in inner
    assert "&amp;amp;" in inner  # a literal "&amp;" typed on the wire stays literal


def test_slack_message_fields_and_escaping():
    alert = alert_from_finding(finding(), description=DESCRIPTION, db="/var/lib/x/sensor.db")
    title, body = render_slack(alert)
    assert title.startswith("[HIGH] Basic credential of")
    assert "\n" not in title and len(title) <= 150
    lines = body.splitlines()
    assert lines[0] == first_sentence(DESCRIPTION)
    fields = {m.group(1): m.group(2) for m in
              (re.match(r"\*([A-Za-z ]+):\* (.*)$", ln) for ln in lines) if m}
    assert fields["Client"] == "`10.0.0.5`"
    assert fields["Registry"] == "`10.0.0.1:5000`"
    assert fields["Repository"] == "`team/app`"
    assert fields["Username"] == slack_code(HOSTILE)
    assert fields["Count"] == "3"
    assert fields["First seen"] == "2026-11-30 00:53:20 UTC"
    assert fields["Last seen"] == "2026-11-30 00:53:20 UTC"
    assert fields["User agent"] == "`curl/8 &lt;!everyone&gt; *x*`"
    # every angle bracket in the body is ours: none (mentions and links cannot form)
    assert "<" not in body and ">" not in body
    # the wire text only ever appears inside code spans
    for line in lines:
        outside = re.sub(r"`[^`]*`", "", line)
        assert "bold" not in outside and "channel" not in outside and "here" not in outside
    assert ("More: `registry-sensor events --db /var/lib/x/sensor.db --rule "
            "plaintext-basic-auth --since 2026-11-30T00:53:20Z`") in body


def test_no_secret_in_any_form():
    alert = alert_from_finding(finding(), description=DESCRIPTION)
    for render in (render_text, render_slack, render_json):
        title, body = render(alert)
        text = title + body
        assert "S3cret-Pa55word!" not in text
        assert "YWxpY2U6UzNjcmV0LVBhNTV3b3JkIQ" not in text
        assert "SECRETQ" not in text and "token=[redacted]" in text
        assert "authorization" not in text.lower() and "Basic YWx" not in text
        assert '"password"' not in text and "password:" not in text.lower()


def test_guard_secrets_shapes():
    assert guard_secrets("Authorization: Basic YWxpY2U6cGFzcw==") == \
        "Authorization: Basic [redacted]"
    assert guard_secrets("GET /x?access_token=abc&n=1") == "GET /x?access_token=[redacted]&n=1"
    assert guard_secrets("https://bob:hunter2@host/") == "https://bob:[redacted]@host/"
    # ordinary prose is left alone
    assert guard_secrets("a bearer token received from the client") == \
        "a bearer token received from the client"


def test_text_message_for_email():
    alert = alert_from_finding(finding(username=CONTROL), description=DESCRIPTION)
    title, body = render_text(alert)
    assert "\r" not in title and "\n" not in title  # no header injection in the Subject
    assert body.splitlines()[0] == first_sentence(DESCRIPTION)
    assert "Username:   alice\\x1b[31m\\r\\nSubject: injected\\x00\\u202etxt.exe" in body
    assert "\nSubject: injected" not in body
    assert "Client:     10.0.0.5" in body and "Registry:   10.0.0.1:5000" in body
    assert "Request:    PUT /v2/team/app/manifests/1.0?token=[redacted] → 201" in body
    assert "Count:      3" in body
    assert "More: registry-sensor events --rule plaintext-basic-auth --since " \
           "2026-11-30T00:53:20Z" in body


def test_json_message_is_structured():
    alert = alert_from_finding(finding(), description=DESCRIPTION)
    title, body = render_json(alert)
    doc = json.loads(body)
    assert doc["kind"] == "finding" and doc["rule"] == "plaintext-basic-auth"
    assert doc["severity"] == "high" and doc["count"] == 3
    assert doc["src_ip"] == "10.0.0.5" and doc["registry"] == "10.0.0.1:5000"
    assert doc["username"] == HOSTILE  # JSON escaping is the receiver's; control chars are not
    assert doc["first_seen"] == "2026-11-30T00:53:20Z"
    assert doc["command"].startswith("registry-sensor events --rule plaintext-basic-auth")
    assert doc["text"] == render_text(alert)[1]
    assert "password" not in doc and "authorization" not in doc


def test_repeat_and_digest_messages():
    f = finding(username="alice")
    repeat = alert_from_finding(f, count=7, first_seen=1_796_000_100.0,
                                last_seen=1_796_000_200.0, kind="repeat")
    title, body = render_text(repeat)
    assert title.startswith("[HIGH] (x7) ")
    assert "Repeated 7 more times since the last alert" in body
    assert "Count:      7" in body
    items = [alert_from_finding(finding(username=f"user{i}", severity=s))
             for i, s in enumerate(["low", "critical", "medium"])]
    dig = digest(items, {"external-source": 4})
    title, body = render_text(dig)
    assert title == "[CRITICAL] 7 alerts in a burst (highest critical)"
    assert body.count("\n- [") == 3
    assert "- ... and 4 more (external-source 4)" in body
    stitle, sbody = render_slack(dig)
    assert "<" not in sbody and sbody.count("• ") == 4


def test_test_message():
    title, body = render_text(probe_alert())
    assert title == "[INFO] Test message from registry-sensor"
    assert "No finding was made" in body


@pytest.mark.parametrize("url", [
    "slack://T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx",
    "slack://T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx/#security",
    "https://hooks.slack.com/services/T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx",
])
def test_slack_urls_are_accepted_by_apprise(url):
    assert check_apprise_url(url)
    target = Target(AlertTarget(name="chat", url=url), AlertsConfig())
    assert target.format == "slack"
    assert target.display.startswith("slack://")
    assert "abcdefghijklmnopqrstuvwx" not in target.display
    assert "T1234ABCD" not in target.display and "B5678EFGH" not in target.display


def test_slack_message_through_apprise_arrives_inert(monkeypatch, loopback_only):
    from apprise.plugins.slack import NotifySlack

    with HttpReceiver() as receiver:
        monkeypatch.setattr(NotifySlack, "webhook_url",
                            f"http://127.0.0.1:{receiver.port}/services")
        target = Target(AlertTarget(name="chat", url="slack://T1234ABCD/B5678EFGH/"
                                                     "abcdefghijklmnopqrstuvwx"),
                        AlertsConfig(timeout=2))
        alert = alert_from_finding(finding(), description=DESCRIPTION)
        result = target.deliver(alert)
        assert result.ok, result.reason
    [request] = receiver.requests
    assert request["path"] == "/services/T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx"
    payload = json.loads(request["raw"])
    blocks = payload["attachments"][0]["blocks"]
    header = blocks[0]["text"]
    assert header["type"] == "plain_text" and header["text"].startswith("[HIGH] Basic credential")
    section = blocks[1]["text"]
    assert section["type"] == "mrkdwn"
    # our mrkdwn arrives byte for byte: apprise converted nothing
    assert section["text"] == render_slack(alert)[1]
    everything = json.dumps(payload)
    for live in ("<!channel>", "<!here>", "<!everyone>", "<@U0123>", "<http://evil"):
        assert live not in everything
    assert "S3cret" not in everything
    assert base64.b64encode(b"alice:S3cret-Pa55word!").decode() not in everything


def test_email_and_json_bodies_are_declared_text():
    alert = alert_from_finding(finding(), description=DESCRIPTION)
    mail = Target(AlertTarget(name="m", url="mailto://127.0.0.1:2525?from=a@example.com&"
                                            "to=b@example.com"), AlertsConfig())
    hook = Target(AlertTarget(name="h", url="json://127.0.0.1:9/x"), AlertsConfig())
    assert mail.format == "text" and hook.format == "json"
    assert mail.render(alert) == render_text(alert)
    assert hook.render(alert) == render_json(alert)
    assert apprise.NotifyFormat.TEXT  # the body_format both are sent with
