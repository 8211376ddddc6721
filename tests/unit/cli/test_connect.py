"""`connect`: a stage waits for a broker that does not answer yet, and fails at once on
credentials or protocol (the one-line errors of colstream.infra.kafka_check)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import tenacity
import typer

from colstream.cli import common
from colstream.infra import kafka_check
from colstream.infra.settings import ColstreamSettings

SETTINGS = ColstreamSettings(kafka={"bootstrap_servers": "localhost:1"})


def _scripted(monkeypatch: pytest.MonkeyPatch, outcomes: list[BaseException | None]) -> list[int]:
    calls: list[int] = []

    def check(settings: ColstreamSettings, timeout_s: float = 15.0) -> Any:
        calls.append(len(calls))
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return object()

    monkeypatch.setattr(kafka_check, "check_broker", check)
    monkeypatch.setattr("colstream.app.resolve_broker", lambda settings, start=False: settings)
    return calls


def test_a_stage_waits_for_a_broker_that_comes_up(monkeypatch: pytest.MonkeyPatch) -> None:
    down = kafka_check.BrokerUnreachable("no Kafka broker answers on localhost:1 (connection refused)")
    calls = _scripted(monkeypatch, [down, down, None])
    # The waits between tries are recorded, not slept: their lengths are what is checked.
    naps: list[float] = []
    monkeypatch.setattr(tenacity.nap, "time", SimpleNamespace(sleep=naps.append))
    assert common.connect(SETTINGS, wait_for_broker=True) is SETTINGS
    assert len(calls) == 3
    assert naps == [1, 2]  # exponential backoff between the tries


def test_a_wrong_password_fails_at_once_even_when_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _scripted(monkeypatch, [kafka_check.BrokerProblem("SASL authentication failed"), None])
    with pytest.raises(typer.Exit):
        common.connect(SETTINGS, wait_for_broker=True)
    assert len(calls) == 1


def test_commands_do_not_wait_for_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _scripted(monkeypatch, [kafka_check.BrokerUnreachable("down"), None])
    with pytest.raises(typer.Exit):
        common.connect(SETTINGS)
    assert len(calls) == 1
