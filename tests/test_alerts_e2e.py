"""Alerting end to end: `registry-sensor replay --alert` and `registry-sensor alert test` as a
user runs them, against real receivers on 127.0.0.1: an SMTP server (aiosmtpd) reached through
apprise's mailto:// URL, and HTTP servers reached through json:// that answer, fail (500),
refuse connections, or accept and never answer."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from alert_receivers import HttpReceiver, SmtpReceiver, free_port
from conftest import PCAPS, run_cli

PASSWORD = "S3cret-Pa55word!"
CREDENTIAL = f"alice:{PASSWORD}"
SECRET_FORMS = (
    PASSWORD, quote(PASSWORD, safe=""), CREDENTIAL,
    base64.b64encode(CREDENTIAL.encode()).decode(),
    base64.b64encode(CREDENTIAL.encode()).decode().rstrip("="),
    base64.b64encode(PASSWORD.encode()).decode().rstrip("="),
)
BASIC = PCAPS / "basic-auth-push.pcap"
PUSH = PCAPS / "anonymous-push-pull.pcap"


def write_config(tmp_path: Path, targets: str, **settings) -> Path:
    defaults = dict(timeout=1, retries=2, backoff=0.2, min_interval=0, drain_timeout=5,
                    burst_count=100)
    defaults.update(settings)
    lines = ["key_file: fingerprint.key", "alerts:"]
    lines += [f"  {k}: {v}" for k, v in defaults.items()]
    lines += ["  targets:", targets.rstrip("\n")]
    path = tmp_path / "alerts.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def replay(tmp_path: Path, config: Path, *pcaps: Path, alert=True, json_summary=True,
           db_name="sensor.db"):
    db = tmp_path / db_name
    args = ["replay", *pcaps, "--db", db, "--config", config]
    if alert:
        args.append("--alert")
    if json_summary:
        args.append("--json")
    started = time.monotonic()
    rc, out, err = run_cli(args, timeout=60)
    elapsed = time.monotonic() - started
    summary = json.loads(out) if json_summary and rc == 0 else None
    return rc, out, err, db, elapsed, summary


def events(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY ts, rowid")]
    conn.close()
    return rows


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["ts"], r["rule"], r["severity"], r["title"], r["src_ip"], r["username"],
             r["repository"], r["count"], r["details"]) for r in rows]


def test_email_through_mailto_to_a_real_smtp_server(tmp_path):
    with SmtpReceiver() as smtp:
        config = write_config(tmp_path, f"""\
    - name: security-mail
      url: "{smtp.url()}"
      min_severity: high
      rules: [plaintext-basic-auth]
""")
        rc, out, err, db, elapsed, summary = replay(tmp_path, config, BASIC)
        assert rc == 0, err
        mails = smtp.messages
    rows = [r for r in events(db) if r["rule"] == "plaintext-basic-auth"]
    assert rows, "the capture must raise plaintext-basic-auth"
    t = summary["alerts"]["targets"]["security-mail"]
    assert t["delivered"] == len(mails) >= 2 and t["failed"] == 0
    first, *rest = mails
    assert first["Subject"] == "[HIGH] Basic credential of alice sent in clear text to " \
                               "127.0.0.1:5000"
    assert first["From"].addresses[0].addr_spec == "sensor@example.com"
    assert first["To"].addresses[0].addr_spec == "ops@example.com"
    body = SmtpReceiver.text_of(first)
    lines = body.splitlines()
    assert lines[0] == ("A client sent an HTTP Basic credential (username and password, "
                        "base64-encoded, not encrypted) to the registry over plain HTTP.")
    assert "Rule:       plaintext-basic-auth (high)" in lines
    assert "Client:     127.0.0.1" in lines
    assert "Registry:   127.0.0.1:5000" in lines
    assert "Username:   alice" in lines
    assert "First seen: 2026-12-04 20:06:08 UTC" in lines
    assert f"More: registry-sensor events --db {db} --rule plaintext-basic-auth --since " \
           f"2026-12-04T20:06:08Z" in lines
    # every matching transaction is accounted for: the counts in the mails add up to SQLite's
    counted = sum(int(next(ln.split()[-1] for ln in SmtpReceiver.text_of(m).splitlines()
                           if ln.startswith("Count:"))) for m in mails)
    assert counted == sum(r["count"] for r in rows)
    assert any(m["Subject"].startswith("[HIGH] (x") for m in rest)  # repeats: one message


def test_json_webhook_on_a_real_http_server(tmp_path):
    with HttpReceiver() as hook:
        config = write_config(tmp_path, f"""\
    - name: soc
      url: "{hook.url('/registry-sensor/alerts')}"
      min_severity: info
""")
        rc, out, err, db, elapsed, summary = replay(tmp_path, config, PUSH)
        assert rc == 0, err
        requests = list(hook.requests)
    rows = events(db)
    assert {r["path"] for r in requests} == {"/registry-sensor/alerts"}
    assert all(r["headers"]["Content-Type"] == "application/json" for r in requests)
    payloads = [json.loads(r["raw"]) for r in requests]
    assert all(set(p) >= {"version", "title", "message", "type"} for p in payloads)
    docs = [json.loads(p["message"]) for p in payloads]
    push = [d for d in docs if d["rule"] == "anonymous-push"]
    assert push[0]["kind"] == "finding" and push[0]["severity"] == "critical"
    assert push[0]["repository"] == "library/demo" and push[0]["registry"] == "127.0.0.1:5000"
    assert push[0]["src_ip"] == "127.0.0.1" and push[0]["dest_port"] == 5000
    assert push[0]["command"].startswith(f"registry-sensor events --db {db} --rule "
                                         f"anonymous-push --since 2026-12-04T")
    assert payloads[docs.index(push[0])]["type"] == "failure"  # critical → failure
    assert payloads[docs.index(push[0])]["title"] == \
        "[CRITICAL] Anonymous push to library/demo accepted by 127.0.0.1:5000"
    for rule in {r["rule"] for r in rows}:
        assert sum(d["count"] for d in docs if d["rule"] == rule) == \
            sum(r["count"] for r in rows if r["rule"] == rule), rule
    assert summary["alerts"]["targets"]["soc"]["delivered"] == len(requests)


def test_replay_is_quiet_without_alert(tmp_path):
    with HttpReceiver() as hook:
        config = write_config(tmp_path, f'    - url: "{hook.url()}"\n')
        rc, out, err, db, elapsed, summary = replay(tmp_path, config, PUSH, alert=False)
        assert rc == 0, err
        assert "alerts" not in summary
        time.sleep(0.2)
        assert hook.requests == []
    assert events(db)


def test_replay_alert_without_targets_is_a_usage_error(tmp_path, config_path):
    rc, out, err = run_cli(["replay", PUSH, "--db", tmp_path / "x.db", "--config", config_path,
                            "--alert"])
    assert rc == 2 and "--alert: no alert targets configured" in err


@pytest.mark.parametrize("fault", ["refused", "hang", "error"])
def test_a_faulty_target_never_holds_up_the_replay(tmp_path, fault):
    baseline_cfg = write_config(tmp_path, '    - url: "json://127.0.0.1:9/unused"\n')
    rc, _, err, base_db, base_elapsed, _ = replay(tmp_path, baseline_cfg, PUSH, BASIC,
                                                  alert=False, db_name="baseline.db")
    assert rc == 0, err
    with HttpReceiver("hang" if fault == "hang" else "error") as bad, HttpReceiver() as good:
        bad_url = f"json://127.0.0.1:{free_port()}/x" if fault == "refused" else bad.url()
        config = write_config(tmp_path, f"""\
    - name: bad
      url: "{bad_url}"
      min_severity: info
    - name: good
      url: "{good.url()}"
      min_severity: info
""", timeout=1, drain_timeout=4, retries=3, backoff=0.3)
        rc, out, err, db, elapsed, summary = replay(tmp_path, config, PUSH, BASIC)
        good_requests = len(good.requests)
        bad_requests = len(bad.requests)
    assert rc == 0, err
    # the record is whole: the same events as without alerting
    assert comparable(events(db)) == comparable(events(base_db))
    assert len(events(db)) >= 3
    # on time: well within the drain bound (and a generous absolute bound)
    assert elapsed < 30
    assert summary["seconds"] < 4 + 3, summary["seconds"]
    alerts = summary["alerts"]
    assert alerts["drain_seconds"] <= 4 + 0.5
    bad_t, good_t = alerts["targets"]["bad"], alerts["targets"]["good"]
    # the healthy target got everything, the faulty one nothing
    assert good_t["delivered"] == good_requests >= 3 and good_t["failed"] == 0
    assert bad_t["delivered"] == 0 and bad_t["failed"] >= 2 and bad_t["retried"] >= 1
    assert bad_t["left"] + bad_t["gave_up"] + bad_t["pending"] >= 1
    expected = {"refused": "Connection refused", "hang": "timed out",
                "error": "error=500"}[fault]
    assert expected in bad_t["last_error"]
    if fault != "refused":
        assert bad_requests == bad_t["failed"]
    # and the user is told, on stderr
    assert "alerts: bad (json://127.0.0.1:" in err
    assert "failed attempts" in err and expected in err
    assert "alerts: good" not in err


def test_text_summary_reports_alerts(tmp_path):
    with HttpReceiver("error") as bad:
        config = write_config(tmp_path, f'    - name: bad\n      url: "{bad.url()}"\n',
                              retries=0)
        rc, out, err, *_ = replay(tmp_path, config, PUSH, json_summary=False)
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("  bad (json://"))
    assert "0 delivered" in line and "failed attempts" in line and "given up" in line
    assert "last error: Failed to send JSON POST notification" in line
    assert next(ln for ln in out.splitlines() if ln.startswith("alerts:"))


def test_known_password_is_in_no_alert_payload(tmp_path):
    with SmtpReceiver() as smtp, HttpReceiver() as json_hook, HttpReceiver() as slack_form, \
            HttpReceiver() as text_form:
        config = write_config(tmp_path, f"""\
    - name: mail
      url: "{smtp.url()}"
      min_severity: info
    - name: json
      url: "{json_hook.url()}"
      min_severity: info
    - name: slack-form
      url: "{slack_form.url()}"
      min_severity: info
      format: slack
    - name: text-form
      url: "{text_form.url()}"
      min_severity: info
      format: text
""", burst_count=3, burst_window=60, repeat_period=0.01)
        rc, out, err, db, elapsed, summary = replay(tmp_path, config, BASIC)
        assert rc == 0, err
        received = {
            "mail": smtp.raw + [m.as_bytes() for m in smtp.messages]
            + [SmtpReceiver.text_of(m).encode() for m in smtp.messages]
            + [str(m["Subject"]).encode() for m in smtp.messages],
            "json": json_hook.raw + [json.dumps(p, ensure_ascii=False).encode()
                                     for p in json_hook.payloads],
            "slack-form": slack_form.raw + [p["message"].encode() for p in slack_form.payloads],
            "text-form": text_form.raw + [p["message"].encode() for p in text_form.payloads],
        }
    assert summary["alerts"]["targets"]["json"]["digested"] >= 1  # a digest was among them
    for name, blobs in received.items():
        assert blobs, name
        everything = b"\n".join(blobs)
        for form in SECRET_FORMS:
            assert form.encode() not in everything, (name, form)
        assert b"alice" in everything, name
    # and the capture really holds the password: the test would notice if it did not
    raw = BASIC.read_bytes()
    assert base64.b64encode(CREDENTIAL.encode()) in raw


def test_alert_test_command(tmp_path, monkeypatch):
    with SmtpReceiver() as smtp, HttpReceiver() as hook:
        (tmp_path / "mail.url").write_text(smtp.url() + "\n")
        config = write_config(tmp_path, """\
    - name: mail
      url_file: mail.url
    - name: soc
      url_env: RS_TEST_SOC_URL
""")
        env = {"RS_TEST_SOC_URL": hook.url("/hook/Zq9PathToken") + "?token=Zq9QueryToken"}
        rc, out, err = run_cli(["alert", "test", "--config", config], env=env)
        assert rc == 0, (out, err)
        assert len(smtp.messages) == 1 and len(hook.requests) == 1
        assert smtp.messages[0]["Subject"] == "[INFO] Test message from registry-sensor"
        assert hook.payloads[0]["type"] == "success"
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert rows["mail"].split()[1] == f"mailto://127.0.0.1:{smtp.port}"
    assert rows["mail"].endswith("delivered")
    assert rows["soc"].split()[1] == f"json://127.0.0.1:{hook.port}"
    assert "Zq9" not in out + err


def test_alert_test_command_fails_when_a_target_fails(tmp_path):
    port = free_port()
    with HttpReceiver() as hook:
        config = write_config(tmp_path, f"""\
    - name: up
      url: "{hook.url()}"
    - name: down
      url: "json://user:Zq9Password@127.0.0.1:{port}/Zq9Path"
""")
        rc, out, err = run_cli(["alert", "test", "--config", config])
    assert rc == 1, (out, err)
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert rows["up"].endswith("delivered")
    assert "failed: " in rows["down"] and "Connection refused" in rows["down"]
    assert rows["down"].split()[1] == f"json://127.0.0.1:{port}"
    assert "Zq9" not in out + err


def test_alert_test_without_targets_is_exit_2(config_path):
    rc, out, err = run_cli(["alert", "test", "--config", config_path])
    assert rc == 2 and "no alert targets configured" in err
