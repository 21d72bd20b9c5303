"""Noise control, driven by an injected clock: repeats become one message with a count, a
burst of different findings becomes one digest, and nothing counted is lost at shutdown."""

from __future__ import annotations

from sensor.records import Finding
from sensor.sinks.alert_noise import NoiseControl


def finding(rule="anonymous-push", src="10.0.0.5", repo="library/demo", user=None, count=1,
            ts=1_796_000_000.0, severity="critical") -> Finding:
    return Finding(ts=ts, rule=rule, severity=severity, title=f"{rule} {src} {repo}",
                   src_ip=src, dest_ip="10.0.0.1", dest_port=5000, community_id=None,
                   username=user, repository=repo, count=count)


def control(**kw) -> NoiseControl:
    args = dict(repeat_period=600, burst_count=3, burst_window=60, digest_max=4)
    args.update(kw)
    return NoiseControl(**args)


def test_repeats_of_one_group_become_one_message_with_a_count():
    nc = control()
    [first] = nc.offer(finding(ts=100.0), now=0)
    assert first.kind == "finding" and first.count == 1
    for i in range(1, 11):  # ten more within the period, some carrying counts already
        assert nc.offer(finding(ts=100.0 + i, count=2 if i == 10 else 1), now=i * 10) == []
    assert nc.next_due() == 600
    assert nc.tick(now=599) == []
    [repeat] = nc.tick(now=600)
    assert repeat.kind == "repeat" and repeat.count == 11
    assert repeat.first_seen == 101.0 and repeat.last_seen == 110.0
    assert nc.repeats_merged == 10
    # a quiet period follows: nothing pending, nothing due
    assert nc.tick(now=1200) == [] and nc.next_due() is None
    # after it, the group is new again
    assert len(nc.offer(finding(ts=2000.0), now=1300)) == 1


def test_different_groups_are_not_merged():
    nc = control(burst_count=100)
    out = []
    for user in ("alice", "bob"):
        out += nc.offer(finding(rule="plaintext-basic-auth", user=user), now=1)
    out += nc.offer(finding(src="10.0.0.6"), now=1)
    out += nc.offer(finding(repo="library/other"), now=1)
    assert len(out) == 4


def test_burst_becomes_one_digest():
    nc = control(burst_count=3, burst_window=60, digest_max=4)
    sent = []
    for i in range(10):  # ten different findings within two seconds
        sent += nc.offer(finding(src=f"10.0.0.{i}"), now=i * 0.2)
    assert len(sent) == 3  # the first three go at once
    assert nc.next_due() == 0.6 + 60  # the digest waits for the window to close
    assert nc.tick(now=30) == []
    [dig] = nc.tick(now=61)
    assert dig.kind == "digest"
    assert len(dig.items) == 4 and dig.more == {"anonymous-push": 3}
    assert dig.count == 7
    assert [i.data["src_ip"] for i in dig.items] == [f"10.0.0.{i}" for i in range(3, 7)]
    assert nc.digested == 7
    # the window has passed: single findings go out on their own again
    assert len(nc.offer(finding(src="10.0.0.99"), now=200)) == 1


def test_a_single_held_alert_is_sent_as_itself():
    nc = control(burst_count=1, burst_window=10)
    assert len(nc.offer(finding(src="a"), now=0)) == 1
    assert nc.offer(finding(src="b"), now=1) == []
    [alone] = nc.tick(now=11)
    assert alone.kind == "finding" and alone.data["src_ip"] == "b"


def test_flush_at_shutdown_sends_what_is_counted_and_held():
    nc = control(burst_count=2)
    nc.offer(finding(src="a"), now=0)
    nc.offer(finding(src="a"), now=1)  # a repeat, counted
    nc.offer(finding(src="b"), now=2)
    nc.offer(finding(src="c"), now=3)  # over the burst: held
    out = nc.flush(now=4)
    kinds = sorted(a.kind for a in out)
    # the repeat of a goes into the held digest with c (still inside the burst window)
    assert kinds == ["digest"]
    assert {i.kind for i in out[0].items} == {"finding", "repeat"}
    assert nc.flush(now=5) == []


def test_repeats_pass_through_the_burst_limit_too():
    nc = control(repeat_period=10, burst_count=2, burst_window=100)
    out = []
    for i in range(5):
        out += nc.offer(finding(src=f"h{i}"), now=0)
        out += nc.offer(finding(src=f"h{i}"), now=1)
    assert len(out) == 2
    out = nc.tick(now=10)  # five repeat summaries due at once: all held for the digest
    assert out == []
    [dig] = nc.tick(now=101)
    assert dig.kind == "digest" and dig.count == 8  # 3 first findings + 5 repeats
