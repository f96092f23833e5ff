"""Shared fixtures. Tests that need a real component FAIL, never skip, when it is absent."""

from __future__ import annotations

import os
import socket

import pytest

RABBITMQ_HOST = os.environ.get("VIRTBUS_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("VIRTBUS_TEST_RABBITMQ_PORT", "5672"))


@pytest.fixture
def rabbitmq() -> None:
    """RabbitMQ must answer on 127.0.0.1:5672 (guest/guest)."""
    try:
        with socket.create_connection((RABBITMQ_HOST, RABBITMQ_PORT), timeout=2.0):
            pass
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable on {RABBITMQ_HOST}:{RABBITMQ_PORT}: {exc}")
