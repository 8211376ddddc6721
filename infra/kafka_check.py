"""Fast, one-line answers to "why can't I reach the broker?".

A confluent-kafka client never gives up on its own: with a wrong SASL password it
retries authentication forever, and a PLAINTEXT client pointed at a SASL or TLS
listener is disconnected and reconnects forever, so the call that started it just
hangs. :func:`check_broker` connects once with an error callback, watches what
librdkafka reports for at most ``timeout_s``, and raises :class:`BrokerProblem`
with one line that says what is wrong and what to change. An authorization error
on a topic or group names the ACL that is missing (:func:`missing_acl`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata

from colstream.infra.settings import ColstreamSettings

log = logging.getLogger(__name__)

_AUTHZ_CODES = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
}
# "All brokers down" reports before the broker's reachability is judged.
_DISCONNECTS_FOR_MISMATCH = 2


class BrokerProblem(RuntimeError):
    """The broker cannot be used with these settings; the message is one line for a person."""


class BrokerUnreachable(BrokerProblem):
    """Nothing answers at the bootstrap address (down, restarting, not started yet): unlike a
    wrong password or protocol, this can fix itself, so a long-running stage waits for it."""


def principal(settings: ColstreamSettings) -> str:
    user = settings.kafka.sasl_username
    return f"User:{user}" if user else "User:ANONYMOUS"


def missing_acl(settings: ColstreamSettings, resource: str, name: str, operation: str) -> str:
    """The ``kafka-acls`` line that grants what was refused (a name ending in ``-`` is a prefix)."""
    flag = {"topic": f"--topic {name}", "group": f"--group {name}", "cluster": "--cluster"}[resource]
    if name.endswith("-"):
        flag += " --resource-pattern-type prefixed"
    return (f"kafka-acls --bootstrap-server {settings.kafka.bootstrap_servers} --add --allow-principal "
            f"{principal(settings)} --operation {operation} {flag}")


def explain(settings: ColstreamSettings, error: KafkaError, *, resource: str | None = None,
            name: str | None = None, operation: str = "Read", group: str | None = None) -> str:
    """``resource``/``name`` say what was being done (``topic`` ``x``); a refusal of the
    consumer group instead names ``group`` (a prefix when it ends in ``-``)."""
    """One line for a client error: authentication, protocol mismatch, authorization, or as reported."""
    kafka = settings.kafka
    code = error.code()
    text = error.str()
    where = kafka.bootstrap_servers
    if "Unsupported SASL mechanism" in text:
        supported = text.split("supported mechanisms:", 1)[-1].split("(")[0].strip() or "?"
        return (f"{where} does not offer SASL mechanism {kafka.sasl_mechanism} (it offers {supported}): "
                "set COLSTREAM_KAFKA__SASL_MECHANISM to one of those")
    if code == KafkaError._AUTHENTICATION or "SASL authentication" in text or "Authentication failed" in text:
        return (f"authentication to {where} failed for user {kafka.sasl_username!r} with "
                f"{kafka.sasl_mechanism or 'no SASL mechanism'} over {kafka.security_protocol}: check "
                "COLSTREAM_KAFKA__SASL_USERNAME, COLSTREAM_KAFKA__SASL_PASSWORD and COLSTREAM_KAFKA__SASL_MECHANISM")
    if code == KafkaError._SSL or "SSL handshake" in text:
        return (f"TLS handshake with {where} failed: check COLSTREAM_KAFKA__SECURITY_PROTOCOL and "
                "COLSTREAM_KAFKA__SSL_CA_LOCATION")
    if code == KafkaError.GROUP_AUTHORIZATION_FAILED and resource != "group":
        resource, name, operation = "group", group, "Describe"
    if code in _AUTHZ_CODES:
        kind = resource or _AUTHZ_CODES[code]
        target = name or ("kafka-cluster" if kind == "cluster" else "?")
        return (f"{principal(settings)} is not authorized to {operation} {kind} {target!r} on {where}; "
                f"an admin can grant it: {missing_acl(settings, kind, target, operation)}")
    return f"Kafka at {where}: {text}"


def _mismatch(settings: ColstreamSettings) -> str:
    kafka = settings.kafka
    if kafka.security_protocol in ("PLAINTEXT", "SSL"):
        hint = "the listener probably requires SASL: set COLSTREAM_KAFKA__SECURITY_PROTOCOL=SASL_PLAINTEXT " \
               "or SASL_SSL with COLSTREAM_KAFKA__SASL_MECHANISM and credentials"
    else:
        hint = ("the listener probably expects another protocol or SASL mechanism than "
                f"{kafka.security_protocol}/{kafka.sasl_mechanism}: check COLSTREAM_KAFKA__SECURITY_PROTOCOL "
                "and COLSTREAM_KAFKA__SASL_MECHANISM")
    return f"{kafka.bootstrap_servers} closes the connection during the handshake: {hint}"


def check_broker(settings: ColstreamSettings, timeout_s: float = 15.0) -> ClusterMetadata:
    """Cluster metadata from the configured broker, or :class:`BrokerProblem` within ``timeout_s``."""
    errors: list[KafkaError] = []
    config: dict[str, Any] = {**settings.kafka.common_config(), "error_cb": errors.append,
                              "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
                              "reconnect.backoff.max.ms": 1000}
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    last: KafkaError | None = None
    while time.monotonic() < deadline:
        try:
            return admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as exc:
            last = exc.args[0]
        admin.poll(0)  # serves error_cb
        for error in errors:
            code = error.code()
            if code in (KafkaError._AUTHENTICATION, KafkaError._SSL) or code in _AUTHZ_CODES:
                raise BrokerProblem(explain(settings, error))
        down = [e for e in errors if e.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)]
        if len(down) >= _DISCONNECTS_FOR_MISMATCH:
            # Brokers "down" although their port accepts connections: the listener hangs up
            # on this client's protocol (PLAINTEXT against SASL or TLS, say).
            if _any_port_open(settings.kafka.bootstrap_servers or ""):
                raise BrokerProblem(_mismatch(settings))
            raise BrokerUnreachable(_nothing_listens(settings))
    if _refused(errors):
        raise BrokerUnreachable(_nothing_listens(settings))
    detail = errors[-1].str() if errors else (last.str() if last is not None else "no answer")
    raise BrokerUnreachable(
        f"Kafka at {settings.kafka.bootstrap_servers} did not answer within {timeout_s:.0f}s: {detail}"
    )


def _nothing_listens(settings: ColstreamSettings) -> str:
    return (f"no Kafka broker answers on {settings.kafka.bootstrap_servers} (connection refused): "
            "start one (`colstream kafka start`) or fix KAFKA_BOOTSTRAP_SERVERS")


def _any_port_open(bootstrap_servers: str, timeout_s: float = 1.0) -> bool:
    import socket

    for server in bootstrap_servers.split(","):
        address = server.strip().rsplit("://", 1)[-1]
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            continue
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def _refused(errors: list[KafkaError]) -> bool:
    return any("Connection refused" in e.str() for e in errors)


def check_topic_access(settings: ColstreamSettings, topic: str, operation: str = "Read",
                       timeout_s: float = 10.0) -> None:
    """:class:`BrokerProblem` naming the missing ACL when ``topic``'s metadata is refused."""
    check_broker(settings, timeout_s)
    admin = AdminClient(settings.kafka.common_config())
    try:
        found = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise BrokerProblem(explain(settings, exc.args[0], resource="topic", name=topic, operation=operation)) from None
    if found is None:
        raise BrokerProblem(f"topic {topic!r} does not exist on {settings.kafka.bootstrap_servers}: "
                            "run `colstream topics create`")
    if found.error is not None:
        if found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise BrokerProblem(f"topic {topic!r} does not exist on {settings.kafka.bootstrap_servers}: "
                                "run `colstream topics create`")
        raise BrokerProblem(explain(settings, found.error, resource="topic", name=topic, operation=operation))
