"""The alert sink in-process, against real HTTP receivers on 127.0.0.1: the producer never
waits, the queue drops the lowest severities first, retries back off, a 4xx is not retried,
targets filter, bursts become digests, and close() drains within its bound."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from alert_receivers import HttpReceiver, free_port, refuse_non_loopback, wait_for

from sensor.records import Finding
from sensor.sinks.alert_config import AlertsConfig, AlertTarget
from sensor.sinks.alerts import AlertSink, SeverityQueue


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Nothing in these tests may connect anywhere but loopback."""
    refuse_non_loopback(monkeypatch)


def finding(i=0, severity="high", rule="plaintext-basic-auth", count=1) -> Finding:
    return Finding(ts=1_796_000_000.0 + i, rule=rule, severity=severity, title=f"{rule} #{i}",
                   src_ip=f"10.0.{i // 250}.{i % 250}", dest_ip="10.0.0.1", dest_port=5000,
                   community_id=None, username=f"user{i}", repository="team/app", count=count)


def config(*targets: AlertTarget, **kw) -> AlertsConfig:
    args = dict(timeout=1.0, retries=2, backoff=0.2, min_interval=0, drain_timeout=5,
                burst_count=1000, burst_window=1, repeat_period=60)
    args.update(kw)
    return AlertsConfig(targets=targets, **args)


def hook(name: str, receiver_or_url, **kw) -> AlertTarget:
    url = receiver_or_url if isinstance(receiver_or_url, str) else receiver_or_url.url()
    return AlertTarget(name=name, url=url, min_severity=kw.pop("min_severity", "info"), **kw)


def docs(receiver: HttpReceiver) -> list[dict]:
    return [json.loads(p["message"]) for p in receiver.payloads]


def test_queue_drops_lowest_severity_first():
    q = SeverityQueue(3)
    for i, sev in enumerate(["low", "medium", "info"]):
        q.put(finding(i, sev))
    q.put(finding(3, "high"))  # full: the info one goes
    q.put(finding(4, "critical"))  # full: the low one goes
    q.put(finding(5, "info"))  # full of higher ones: the newcomer goes
    q.put(finding(6, "medium"))  # full: the newest medium goes? no: only lower are evicted
    assert q.dropped == {"info": 2, "low": 1, "medium": 1}
    got = [q.get(0).severity for _ in range(3)]
    assert got == ["medium", "high", "critical"]  # arrival order among the kept
    assert q.get(0) is None


def test_producer_never_waits_on_a_hanging_target():
    with HttpReceiver("hang") as hang:
        cfg = config(hook("hang", hang), queue_size=50, timeout=2.0, drain_timeout=1.5)
        sink = AlertSink(cfg)

        def produce():
            for i in range(2000):
                sink.finding(finding(i, severity=("low", "high")[i % 2]))

        producer = threading.Thread(target=produce, daemon=True)
        started = time.monotonic()
        producer.start()
        producer.join(5)  # a producer that waits on the network would still be here
        produced = time.monotonic() - started
        assert not producer.is_alive(), "finding() blocked behind a hanging target"
        assert produced < 1.0, f"2000 finding() calls took {produced:.2f} s"
        assert wait_for(lambda: len(hang.requests) >= 1, 5)
        t0 = time.monotonic()
        report = sink.close()
        closed = time.monotonic() - t0
    assert closed < 1.5 + 0.5, closed
    dropped = report["queue_dropped"]
    assert dropped["low"] == 1000  # every low one was pushed out before any high one
    assert dropped["high"] > 0 and sum(dropped.values()) <= 2000
    assert report["undelivered"] > 0
    assert report["targets"]["hang"]["delivered"] == 0


def test_retries_back_off_then_deliver():
    with HttpReceiver("ok", fail_first=2) as flaky:
        sink = AlertSink(config(hook("flaky", flaky), backoff=0.3, retries=3))
        sink.finding(finding(1))
        assert wait_for(lambda: len(flaky.requests) == 3, 10)
        report = sink.close()
    t = report["targets"]["flaky"]
    assert (t["delivered"], t["failed"], t["retried"], t["gave_up"]) == (1, 2, 2, 0)
    assert "503" in t["last_error"] or "Service Unavailable" in t["last_error"]
    times = [r["at"] for r in flaky.requests]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # 0.3 s, then 0.6 s
    assert docs(flaky)[2]["username"] == "user1"  # the same message, tried again


def test_a_4xx_answer_is_not_retried():
    with HttpReceiver("reject") as reject:
        sink = AlertSink(config(hook("reject", reject)))
        sink.finding(finding(1))
        assert wait_for(lambda: len(reject.requests) == 1, 5)
        report = sink.close()
    t = report["targets"]["reject"]
    assert (t["delivered"], t["failed"], t["retried"], t["gave_up"]) == (0, 1, 0, 1)
    assert "400" in t["last_error"]


def test_targets_filter_by_severity_and_rule():
    with HttpReceiver() as high_only, HttpReceiver() as push_only, HttpReceiver() as all_:
        sink = AlertSink(config(hook("high", high_only, min_severity="high"),
                                hook("push", push_only, rules=("anonymous-push",)),
                                hook("all", all_)))
        sink.finding(finding(1, "medium", rule="external-source"))
        sink.finding(finding(2, "critical", rule="anonymous-push"))
        sink.finding(finding(3, "high", rule="plaintext-basic-auth"))
        sink.finding(finding(4, "info", rule="tls-registry"))
        report = sink.close()
    assert sorted(d["rule"] for d in docs(high_only)) == ["anonymous-push",
                                                         "plaintext-basic-auth"]
    assert [d["rule"] for d in docs(push_only)] == ["anonymous-push"]
    assert len(docs(all_)) == 4
    assert report["findings_accepted"] == 4


def test_default_min_severity_is_medium():
    assert AlertTarget(name="x", url="json://127.0.0.1/x").min_severity == "medium"
    with HttpReceiver() as receiver:
        sink = AlertSink(config(AlertTarget(name="x", url=receiver.url())))
        sink.finding(finding(1, "low"))
        sink.finding(finding(2, "info"))
        sink.finding(finding(3, "medium"))
        sink.close()
    assert [d["severity"] for d in docs(receiver)] == ["medium"]


def test_repeats_are_one_message_and_a_count():
    with HttpReceiver() as receiver:
        sink = AlertSink(config(hook("h", receiver), repeat_period=30))
        for n in range(6):
            sink.finding(finding(7, count=1 + n))  # one group; counts 1..6
        sink.close()
    sent = docs(receiver)
    assert [(d["kind"], d["count"]) for d in sent] == [("finding", 1), ("repeat", 20)]


def test_a_burst_becomes_a_digest():
    with HttpReceiver() as receiver:
        sink = AlertSink(config(hook("h", receiver), burst_count=2, burst_window=0.5,
                                digest_max=3))
        for i in range(8):
            sink.finding(finding(i))
        assert wait_for(lambda: len(receiver.requests) == 3, 5)
        time.sleep(0.3)
        assert len(receiver.requests) == 3  # not a flood
        report = sink.close()
    first, second, dig = docs(receiver)
    assert first["kind"] == second["kind"] == "finding"
    assert dig["kind"] == "digest" and dig["count"] == 6
    assert [i["username"] for i in dig["items"]] == ["user2", "user3", "user4"]
    assert dig["more"] == {"plaintext-basic-auth": 3}
    assert report["targets"]["h"]["digested"] == 6
    assert receiver.payloads[2]["title"] == "[HIGH] 6 alerts in a burst (highest high)"


def test_failures_are_reported_without_secrets_and_apprise_stays_quiet(caplog):
    port = free_port()
    url = f"json://127.0.0.1:{port}/hooks/Zq9PathSecret?token=Zq9QuerySecret"
    caplog.set_level(logging.DEBUG)
    sink = AlertSink(config(hook("dead", url), retries=1, backoff=0.1))
    sink.finding(finding(1))
    report = sink.close()
    t = report["targets"]["dead"]
    assert t["target"] == f"json://127.0.0.1:{port}"
    assert (t["failed"], t["retried"], t["gave_up"]) == (2, 1, 1)
    assert "Connection refused" in t["last_error"]
    text = json.dumps(report) + caplog.text
    assert "Zq9PathSecret" not in text and "Zq9QuerySecret" not in text
    assert not [r for r in caplog.records if r.name.startswith("apprise")]
    assert "alerts: dead (json://127.0.0.1:" in caplog.text  # our own report


def test_close_is_bounded_and_says_what_was_left():
    with HttpReceiver("hang") as hang, HttpReceiver() as good:
        sink = AlertSink(config(hook("hang", hang), hook("good", good), timeout=5.0,
                                drain_timeout=2.0))
        for i in range(5):
            sink.finding(finding(i))
        t0 = time.monotonic()
        report = sink.close()
        closed = time.monotonic() - t0
    assert closed < 2.0 + 0.3, closed
    assert report["drain_seconds"] <= 2.3
    assert report["targets"]["good"]["delivered"] == 5  # the hanging one held nobody up
    hang_report = report["targets"]["hang"]
    assert hang_report["delivered"] == 0
    assert hang_report["left"] + hang_report["pending"] + hang_report["gave_up"] >= 4
    assert report["undelivered"] >= 4


def test_no_log_line_shows_a_webhook_path_even_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    with HttpReceiver() as receiver:
        sink = AlertSink(config(hook("h", receiver.url("/services/Zq9PathSecret"))))
        sink.finding(finding(1))
        report = sink.close()
        assert receiver.requests[0]["path"] == "/services/Zq9PathSecret"
    assert report["targets"]["h"]["delivered"] == 1
    assert "Zq9PathSecret" not in caplog.text
