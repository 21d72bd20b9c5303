"""The `alerts:` configuration: targets from url, url_env or url_file, checked by apprise at
start-up; one-line errors naming file, line and key, and never the URL's secret parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from sensor.config import load_config
from sensor.sinks.alert_config import AlertsConfig, AlertTarget
from sensor.yamlfile import ConfigError

SLACK = "slack://T1234ABCD/B5678EFGH/abcdefghijklmnopqrstuvwx"
SECRET = "Zq9SuperSecretPart"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor.yaml"
    path.write_text(text)
    return path


def test_no_alerts_section_means_no_targets(tmp_path):
    cfg = load_config(write(tmp_path, "key_file: k\n"))
    assert cfg.alerts == AlertsConfig() and not cfg.alerts.enabled
    assert load_config(None).alerts.targets == ()


def test_targets_from_url_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_TEST_HOOK", "json://127.0.0.1:8080/hook")
    (tmp_path / "mail.url").write_text(
        "# the SMTP relay\nmailto://127.0.0.1:2525?from=sensor@example.com&to=ops@example.com\n")
    cfg = load_config(write(tmp_path, f"""
alerts:
  min_severity: low
  drain_timeout: 3
  timeout: 2.5
  retries: 1
  burst_count: 10
  targets:
    - name: chat
      url: "{SLACK}"
      min_severity: high
      rules: [anonymous-push, plaintext-basic-auth]
    - name: soc
      url_env: RS_TEST_HOOK
      format: text
    - name: mail
      url_file: mail.url
"""))
    alerts = cfg.alerts
    assert alerts.drain_timeout == 3.0 and alerts.timeout == 2.5 and alerts.retries == 1
    assert alerts.burst_count == 10 and alerts.queue_size == 1000
    chat, soc, mail = alerts.targets
    assert chat == AlertTarget(name="chat", url=SLACK, source="url", min_severity="high",
                               rules=("anonymous-push", "plaintext-basic-auth"))
    assert soc.url == "json://127.0.0.1:8080/hook" and soc.source == "env RS_TEST_HOOK"
    assert soc.min_severity == "low" and soc.format == "text" and soc.rules is None
    assert mail.url.startswith("mailto://127.0.0.1:2525") and mail.source.startswith("file ")
    # the URL is a secret: not in repr()
    assert SLACK not in repr(cfg) and "abcdefghijklmnopqrstuvwx" not in repr(alerts)


@pytest.mark.parametrize("body, where, what", [
    ("alerts:\n  targets:\n    - name: x\n      url: 'nonsense://{s}@host/{s}'\n",
     "sensor.yaml:3: alerts.targets[0].url", "apprise cannot use this nonsense:// URL"),
    ("alerts:\n  targets:\n    - name: x\n      url: 'slack://{s}'\n",
     "sensor.yaml:3: alerts.targets[0].url", "apprise cannot use this slack:// URL"),
    ("alerts:\n  targets:\n    - url: 'json://127.0.0.1/x'\n      url_env: X\n",
     "sensor.yaml:3: alerts.targets[0]", "exactly one of url, url_env, url_file"),
    ("alerts:\n  targets:\n    - url_env: RS_TEST_UNSET_VARIABLE\n",
     "sensor.yaml:3: alerts.targets[0].url_env", "is not set"),
    ("alerts:\n  targets:\n    - url_file: missing.url\n",
     "sensor.yaml:3: alerts.targets[0].url_file", "cannot read"),
    ("alerts:\n  targets:\n    - url: 'json://127.0.0.1/x'\n      min_severity: loud\n",
     "sensor.yaml:3: alerts.targets[0].min_severity", "'loud' is not a severity"),
    ("alerts:\n  targets:\n    - url: 'json://127.0.0.1/x'\n      rules: anonymous-push\n",
     "sensor.yaml:3: alerts.targets[0].rules", "list of rule ids"),
    ("alerts:\n  targets:\n    - url: 'json://127.0.0.1/x'\n      colour: red\n",
     "sensor.yaml:3: alerts.targets[0].colour", "unknown key"),
    ("alerts:\n  drain_timeout: -1\n", "sensor.yaml:2: alerts.drain_timeout", "from 0 to 3600"),
    ("alerts:\n  retries: 1.5\n", "sensor.yaml:2: alerts.retries", "a whole number"),
    ("alerts:\n  targets: {{}}\n", "sensor.yaml:2: alerts.targets", "must be a list"),
    ("alerts:\n  sound: on\n", "sensor.yaml:2: alerts.sound", "unknown key"),
    ("alerts:\n  targets:\n    - {{name: a, url: 'json://127.0.0.1/x'}}\n"
     "    - {{name: a, url: 'json://127.0.0.1/y'}}\n",
     "sensor.yaml:4: alerts.targets[1].name", "'a' is used twice"),
])
def test_config_errors_are_one_line_with_file_line_key(tmp_path, body, where, what):
    path = write(tmp_path, body.format(s=SECRET))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path.parent / where)), message
    assert what in message
    assert SECRET not in message


def test_url_file_with_two_urls_is_an_error(tmp_path):
    (tmp_path / "two.url").write_text("json://127.0.0.1/a\njson://127.0.0.1/b\n")
    with pytest.raises(ConfigError, match=r"alerts.targets\[0\].url_file: .* one URL"):
        load_config(write(tmp_path, "alerts:\n  targets:\n    - url_file: two.url\n"))


def test_invalid_url_is_exit_2_at_start_up_without_the_secret(tmp_path, replay):
    path = write(tmp_path, f"key_file: k\nalerts:\n  targets:\n    - name: ops\n"
                           f"      url: 'slack://{SECRET}'\n")
    for args in (["replay", "pcaps/basic-auth-push.pcap", "--db", tmp_path / "x.db",
                  "--config", path],
                 ["alert", "test", "--config", path]):
        rc, out, err = run_cli(args)
        assert rc == 2, (args, out, err)
        assert err.count("\n") == 1
        assert "alerts.targets[0].url: apprise cannot use this slack:// URL" in err
        assert SECRET not in err + out
    assert not (tmp_path / "x.db").exists()  # stopped before any work
