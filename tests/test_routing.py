"""End to end: which upstream a recipient reaches (design.md, "Routing").

A CSV mapping file in tmp_path and several fake upstreams; the client is a
raw socket so every reply code can be checked.
"""

from __future__ import annotations

import time

import pytest
from proxy_helpers import (
    csv_mapping,
    make_config,
    settle,
    static_mapping,
    transaction,
    wait_sessions_closed,
    write_csv,
)


def rcpt_addresses(upstream) -> list[str]:
    """Every RCPT command any session of `upstream` received."""
    return [c for s in upstream.sessions for c in s.commands if c.upper().startswith("RCPT")]


def send_one(w, recipient: str) -> tuple[int, list[str]]:
    """One transaction to one recipient on a fresh connection; the final reply."""
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", [recipient])
        assert replies[0][0] == 250
        assert final is not None
        client.cmd("QUIT")
        return final
    finally:
        client.close()


def test_full_address_beats_subaddress_beats_domain(willi, fake_upstream, tmp_path) -> None:
    full, sub, domain = fake_upstream(), fake_upstream(), fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [
        ("example.com", f"127.0.0.1:{domain.port}"),
        ("user@example.com", f"127.0.0.1:{sub.port}"),
        ("user+ext@example.com", f"127.0.0.1:{full.port}"),
    ])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes)]))
    cases = [
        ("user+ext@example.com", full),
        ("user+other@example.com", sub),
        ("user@example.com", sub),
        ("someone@example.com", domain),
        ("User+Ext@EXAMPLE.com", full),  # domains and (by default) local parts compare case-insensitively
        ("Someone@Example.COM", domain),
    ]
    for recipient, expected in cases:
        before = len(expected.completed_transactions)
        code, lines = send_one(w, recipient)
        assert code == 250, (recipient, code, lines)
        assert expected.wait_for(lambda e=expected, b=before: len(e.completed_transactions) == b + 1), recipient
    for upstream in (full, sub, domain):
        wait_sessions_closed(upstream)
    assert len(full.completed_transactions) == 2
    assert len(sub.completed_transactions) == 2
    assert len(domain.completed_transactions) == 2
    assert [r.lower() for r in rcpt_addresses(full)] == ["rcpt to:<user+ext@example.com>"] * 2


def test_csv_before_static(willi, fake_upstream, tmp_path) -> None:
    from_csv, from_static = fake_upstream(), fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{from_csv.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes), static_mapping(from_static.port)]))
    assert send_one(w, "bob@example.com")[0] == 250
    assert send_one(w, "bob@only-static.example")[0] == 250
    wait_sessions_closed(from_csv, 1)
    wait_sessions_closed(from_static, 1)
    assert rcpt_addresses(from_csv) == ["RCPT TO:<bob@example.com>"]
    assert rcpt_addresses(from_static) == ["RCPT TO:<bob@only-static.example>"]


def test_first_mapping_that_answers_wins(willi, fake_upstream, tmp_path) -> None:
    """An earlier mapping's domain entry beats a later mapping's full address."""
    first, second = fake_upstream(), fake_upstream()
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    write_csv(one, [("example.com", f"127.0.0.1:{first.port}")])
    write_csv(two, [("bob@example.com", f"127.0.0.1:{second.port}"),
                    ("example.org", f"127.0.0.1:{second.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(one), csv_mapping(two)]))
    assert send_one(w, "bob@example.com")[0] == 250
    assert send_one(w, "bob@example.org")[0] == 250
    wait_sessions_closed(first, 1)
    wait_sessions_closed(second, 1)
    assert rcpt_addresses(first) == ["RCPT TO:<bob@example.com>"]
    assert rcpt_addresses(second) == ["RCPT TO:<bob@example.org>"]


def test_failing_mapping_stops_the_chain(willi, fake_upstream, tmp_path) -> None:
    fallback = fake_upstream()
    missing = tmp_path / "does-not-exist.csv"
    w = willi(config=make_config(tmp_path, [csv_mapping(missing), static_mapping(fallback.port)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        code, lines = replies[1]
        assert code == 451 and lines[0].startswith("4.3.0"), replies
        assert final is not None and final[0] == 503
        client.cmd("QUIT")
    finally:
        client.close()
    settle()
    assert fallback.sessions == []


def test_recipient_routed_elsewhere_gets_452(willi, fake_upstream, tmp_path) -> None:
    a, b = fake_upstream(), fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{a.port}"), ("example.org", f"127.0.0.1:{b.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example",
                                     ["bob@example.com", "carol@example.org", "dave@example.com"])
        assert [r[0] for r in replies] == [250, 250, 452, 250], replies
        assert replies[2][1][0].startswith("4.5.3"), replies[2]
        assert final is not None and final[0] == 250
        settle(0.2)
        assert b.sessions == [], "the second upstream must not see the refused recipient"
        # The client retries the refused recipient in its own transaction.
        replies, final = transaction(client, "alice@sender.example", ["carol@example.org"])
        assert [r[0] for r in replies] == [250, 250]
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(a, 1)
    wait_sessions_closed(b, 1)
    (tx,) = a.completed_transactions
    assert tx.rcpts == ["RCPT TO:<bob@example.com>", "RCPT TO:<dave@example.com>"]
    (tx,) = b.completed_transactions
    assert tx.rcpts == ["RCPT TO:<carol@example.org>"]


def test_unmapped_only_recipient_never_reaches_an_upstream(willi, fake_upstream, tmp_path) -> None:
    a = fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{a.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", ["nobody@elsewhere.example"])
        code, lines = replies[1]
        assert code == 554 and lines[0].startswith("5.7.1"), replies
        assert final is not None and final[0] == 503
        client.cmd("QUIT")
    finally:
        client.close()
    settle()
    assert a.sessions == []


def test_unmapped_recipient_mixed_with_mapped(willi, fake_upstream, tmp_path) -> None:
    a = fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{a.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes)]))
    client = w.raw()
    try:
        client.ehlo()
        replies, final = transaction(client, "alice@sender.example", [
            "nobody@elsewhere.example",  # before any upstream connection exists
            "bob@example.com",
            "other@elsewhere.example",  # while the upstream transaction is open
            "carol@example.com",
        ])
        assert [r[0] for r in replies] == [250, 554, 250, 554, 250], replies
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(a, 1)
    (tx,) = a.completed_transactions
    assert tx.rcpts == ["RCPT TO:<bob@example.com>", "RCPT TO:<carol@example.com>"]
    for session in a.sessions:
        assert b"elsewhere" not in bytes(session.raw)


@pytest.mark.parametrize("interval", ["100ms", "0.1s"])
def test_csv_reload_without_restart(willi, fake_upstream, tmp_path, interval) -> None:
    old, new = fake_upstream(), fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{old.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes, reload_interval=interval)]))
    assert send_one(w, "bob@example.com")[0] == 250
    assert old.wait_for(lambda: len(old.completed_transactions) == 1)

    write_csv(routes, [("example.com", f"127.0.0.1:{new.port}")])
    time.sleep(0.3)
    assert send_one(w, "bob@example.com")[0] == 250
    assert new.wait_for(lambda: len(new.completed_transactions) == 1)
    assert len(old.completed_transactions) == 1

    # A broken file keeps the table in force (no 451, same route).
    tmp = routes.with_name("broken.tmp")
    tmp.write_text("this is not;a routing table\n", encoding="utf-8")
    tmp.replace(routes)
    time.sleep(0.3)
    assert send_one(w, "bob@example.com")[0] == 250
    assert new.wait_for(lambda: len(new.completed_transactions) == 2)
    assert len(old.completed_transactions) == 1

    # And a good file after the broken one is picked up again.
    write_csv(routes, [("example.com", f"127.0.0.1:{old.port}")])
    time.sleep(0.3)
    assert send_one(w, "bob@example.com")[0] == 250
    assert old.wait_for(lambda: len(old.completed_transactions) == 2)


def test_csv_reload_within_one_client_connection(willi, fake_upstream, tmp_path) -> None:
    """The next transaction of the same client connection already uses the new route."""
    old, new = fake_upstream(), fake_upstream()
    routes = tmp_path / "routes.csv"
    write_csv(routes, [("example.com", f"127.0.0.1:{old.port}")])
    w = willi(config=make_config(tmp_path, [csv_mapping(routes, reload_interval="100ms")]))
    client = w.raw()
    try:
        client.ehlo()
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        write_csv(routes, [("example.com", f"127.0.0.1:{new.port}")])
        time.sleep(0.3)
        _, final = transaction(client, "alice@sender.example", ["bob@example.com"])
        assert final is not None and final[0] == 250
        client.cmd("QUIT")
    finally:
        client.close()
    wait_sessions_closed(old, 1)
    wait_sessions_closed(new, 1)
    assert len(old.completed_transactions) == 1
    assert len(new.completed_transactions) == 1
