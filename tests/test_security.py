"""CURVE keys, client authorization and endpoint checks, over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from famulus.ipc.security import (
    CurveServer,
    KeyExistsError,
    KeyStore,
    SecurityError,
    apply_client_curve,
    authorize_client,
    check_tcp_endpoint,
    create_client_keys,
    create_server_keys,
    is_loopback,
    revoke_client,
)

# Long enough for a CURVE handshake on loopback, short enough to keep the suite fast.
REPLY_TIMEOUT_MS = 5000
# How long a rejected client waits to show that no reply comes.
SILENCE_MS = 1500
HANDSHAKE_TIMEOUT_S = 5.0


class Machines:
    """A server key folder and the key folders of an authorized and an unknown client."""

    def __init__(self, root: Path) -> None:
        self.server = root / "server-keys"
        create_server_keys(self.server)
        self.laptop = self.add_client(root, "laptop", authorize=True)
        self.stranger = self.add_client(root, "stranger", authorize=False)

    def add_client(self, root: Path, name: str, *, authorize: bool) -> Path:
        """Create a client key folder holding a copy of the server's public key."""
        folder = root / f"{name}-keys"
        files = create_client_keys(folder, name)
        shutil.copyfile(KeyStore(self.server).server_public, KeyStore(folder).server_public)
        if authorize:
            authorize_client(self.server, files.public, name=name)
        return folder


class Bus:
    """Server and client contexts whose sockets all close, with LINGER 0, in teardown."""

    def __init__(self, keys: Machines) -> None:
        self.keys = keys
        self.server_ctx = zmq.Context()
        # Clients get their own context, as a separate process would, so the server's
        # ZAP handler checks only the server side of each connection.
        self.client_ctx = zmq.Context()
        self.curve = CurveServer(self.server_ctx, keys.server)
        self.sockets: list[zmq.Socket[Any]] = []

    def socket(self, ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        return sock

    def bind_server(self, kind: int) -> tuple[zmq.Socket[Any], str]:
        """Bind a CURVE server socket to an ephemeral port on 127.0.0.1."""
        sock = self.socket(self.server_ctx, kind)
        self.curve.apply(sock)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return sock, f"tcp://127.0.0.1:{port}"

    def connect_client(self, kind: int, endpoint: str,
                       keys_folder: Path | None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """Connect a client, plain when `keys_folder` is None, and return it and its monitor."""
        sock = self.socket(self.client_ctx, kind)
        if keys_folder is not None:
            apply_client_curve(sock, keys_folder)
        monitor = sock.get_monitor_socket()
        monitor.setsockopt(zmq.LINGER, 0)
        self.sockets.append(monitor)
        sock.connect(endpoint)
        return sock, monitor

    def close(self) -> None:
        for sock in reversed(self.sockets):
            sock.close()
        self.curve.stop()
        self.server_ctx.term()
        self.client_ctx.term()


@pytest.fixture
def keys(tmp_path: Path) -> Machines:
    return Machines(tmp_path)


@pytest.fixture
def bus(keys: Machines) -> Iterator[Bus]:
    b = Bus(keys)
    yield b
    b.close()


def wait_handshake(monitor: zmq.Socket[Any]) -> tuple[zmq.Event, int]:
    """Return the first handshake result event seen by a client's monitor."""
    results = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
               zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if not monitor.poll(remaining_ms):
            break
        message = recv_monitor_message(monitor)
        if message["event"] in results:
            return zmq.Event(message["event"]), message["value"]
    pytest.fail(f"no handshake result within {HANDSHAKE_TIMEOUT_S} s")


def serve_one(router: zmq.Socket[Any]) -> list[bytes] | None:
    """Echo one pending request with a b"reply:" prefix and return its frames, or None."""
    if not router.poll(REPLY_TIMEOUT_MS):
        return None
    identity, *body = router.recv_multipart()
    router.send_multipart([identity, b"reply:" + body[-1]])
    return body


def test_authorized_dealer_gets_reply(bus: Bus) -> None:
    router, endpoint = bus.bind_server(zmq.ROUTER)
    dealer, _monitor = bus.connect_client(zmq.DEALER, endpoint, bus.keys.laptop)

    dealer.send(b"ping")

    assert serve_one(router) == [b"ping"]
    assert dealer.poll(REPLY_TIMEOUT_MS)
    assert dealer.recv() == b"reply:ping"


def test_unknown_key_rejected_server_keeps_serving(bus: Bus) -> None:
    router, endpoint = bus.bind_server(zmq.ROUTER)
    stranger, monitor = bus.connect_client(zmq.DEALER, endpoint, bus.keys.stranger)
    stranger.send(b"ping")

    # The ZAP handler replies with status 400, which the client gets as a failed handshake.
    assert wait_handshake(monitor) == (zmq.Event.HANDSHAKE_FAILED_AUTH, 400)
    assert not stranger.poll(SILENCE_MS)
    assert not router.poll(0)

    laptop, _monitor = bus.connect_client(zmq.DEALER, endpoint, bus.keys.laptop)
    laptop.send(b"after")
    assert serve_one(router) == [b"after"]
    assert laptop.poll(REPLY_TIMEOUT_MS)
    assert laptop.recv() == b"reply:after"


def test_plain_client_gets_nothing(bus: Bus) -> None:
    router, endpoint = bus.bind_server(zmq.ROUTER)
    plain, monitor = bus.connect_client(zmq.DEALER, endpoint, None)
    plain.send(b"ping")

    event, _value = wait_handshake(monitor)

    # Depending on timing, libzmq reports a mechanism mismatch or a failure with no detail.
    assert event in (zmq.Event.HANDSHAKE_FAILED_PROTOCOL, zmq.Event.HANDSHAKE_FAILED_NO_DETAIL)
    assert not plain.poll(SILENCE_MS)
    assert not router.poll(0)


def test_pub_sub_reaches_authorized_only(bus: Bus) -> None:
    pub, endpoint = bus.bind_server(zmq.PUB)
    laptop, laptop_monitor = bus.connect_client(zmq.SUB, endpoint, bus.keys.laptop)
    stranger, stranger_monitor = bus.connect_client(zmq.SUB, endpoint, bus.keys.stranger)
    for sub in (laptop, stranger):
        sub.setsockopt(zmq.SUBSCRIBE, b"")

    assert wait_handshake(laptop_monitor)[0] == zmq.Event.HANDSHAKE_SUCCEEDED
    assert wait_handshake(stranger_monitor) == (zmq.Event.HANDSHAKE_FAILED_AUTH, 400)
    # The subscription travels after the handshake, so publish until it has arrived.
    received = None
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while received is None and time.monotonic() < deadline:
        pub.send(b"event")
        if laptop.poll(100):
            received = laptop.recv()
    for _ in range(10):
        pub.send(b"event")

    assert received == b"event"
    assert not stranger.poll(SILENCE_MS)


def test_reload_applies_authorize_and_revoke(bus: Bus, tmp_path: Path) -> None:
    router, endpoint = bus.bind_server(zmq.ROUTER)
    newcomer = bus.keys.add_client(tmp_path, "newcomer", authorize=False)
    authorize_client(bus.keys.server, KeyStore(newcomer).client_public, name="newcomer")

    assert bus.curve.reload() == 2
    dealer, monitor = bus.connect_client(zmq.DEALER, endpoint, newcomer)
    assert wait_handshake(monitor)[0] == zmq.Event.HANDSHAKE_SUCCEEDED
    dealer.send(b"hello")
    assert serve_one(router) == [b"hello"]

    revoke_client(bus.keys.server, "newcomer")
    assert bus.curve.reload() == 1
    _dealer, monitor = bus.connect_client(zmq.DEALER, endpoint, newcomer)
    assert wait_handshake(monitor) == (zmq.Event.HANDSHAKE_FAILED_AUTH, 400)


def test_apply_rejects_other_context(bus: Bus) -> None:
    other = bus.socket(bus.client_ctx, zmq.ROUTER)

    with pytest.raises(SecurityError, match="another zmq.Context"):
        bus.curve.apply(other)


def test_apply_after_stop_raises(bus: Bus) -> None:
    sock = bus.socket(bus.server_ctx, zmq.ROUTER)
    bus.curve.stop()

    assert not bus.curve.running
    with pytest.raises(SecurityError, match="authenticator is stopped"):
        bus.curve.apply(sock)


def test_second_curve_server_same_context(bus: Bus) -> None:
    with pytest.raises(SecurityError, match="one CurveServer per zmq.Context"):
        CurveServer(bus.server_ctx, bus.keys.server)

    assert bus.curve.running


def test_curve_server_without_keys(tmp_path: Path) -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="famulus keys server"):
            CurveServer(ctx, tmp_path / "empty")
    finally:
        ctx.term()


def test_curve_server_bad_client_file(keys: Machines) -> None:
    (KeyStore(keys.server).clients_dir / "broken.key").write_text("not a certificate\n")
    ctx = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="broken.key"):
            CurveServer(ctx, keys.server)
    finally:
        ctx.term()


def test_client_curve_missing_server_key(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    create_client_keys(folder, "laptop")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(SecurityError, match="copy server.key"):
            apply_client_curve(sock, folder)
    finally:
        sock.close()
        ctx.term()


def test_secret_readable_by_others_rejected(keys: Machines) -> None:
    secret = KeyStore(keys.server).server_secret
    os.chmod(secret, 0o644)
    ctx = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="chmod 600"):
            CurveServer(ctx, keys.server)
    finally:
        ctx.term()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_modes(keys: Machines) -> None:
    server = KeyStore(keys.server)
    laptop = KeyStore(keys.laptop)

    assert mode(server.folder) == 0o700
    assert mode(server.clients_dir) == 0o700
    assert mode(server.server_secret) == 0o600
    assert mode(server.server_public) == 0o644
    assert mode(server.clients_dir / "laptop.key") == 0o644
    assert mode(laptop.folder) == 0o700
    assert mode(laptop.client_secret) == 0o600
    assert mode(laptop.client_public) == 0o644


def test_existing_folder_mode_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)

    create_server_keys(folder)

    assert mode(folder) == 0o700


def test_keys_created_with_open_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        files = create_server_keys(tmp_path / "keys")
    finally:
        os.umask(old_umask)

    assert mode(files.secret) == 0o600
    assert mode(tmp_path / "keys") == 0o700
    assert not list((tmp_path / "keys").glob(".server-new-*"))


def test_server_keys_not_overwritten(keys: Machines) -> None:
    store = KeyStore(keys.server)
    before = (store.server_public.read_bytes(), store.server_secret.read_bytes())

    with pytest.raises(KeyExistsError, match="--force"):
        create_server_keys(keys.server)

    assert (store.server_public.read_bytes(), store.server_secret.read_bytes()) == before


def test_force_renames_old_keys(keys: Machines) -> None:
    store = KeyStore(keys.server)
    old_public = store.server_public.read_bytes()
    old_secret = store.server_secret.read_bytes()

    create_server_keys(keys.server, force=True)

    assert store.server_public.read_bytes() != old_public
    [backup_public] = keys.server.glob("server.key.replaced-*")
    [backup_secret] = keys.server.glob("server.key_secret.replaced-*")
    assert backup_public.read_bytes() == old_public
    assert backup_secret.read_bytes() == old_secret
    assert mode(backup_secret) == 0o600


def test_client_keys_not_overwritten(keys: Machines) -> None:
    store = KeyStore(keys.laptop)
    before = store.client_secret.read_bytes()

    with pytest.raises(KeyExistsError):
        create_client_keys(keys.laptop, "laptop")
    assert store.client_secret.read_bytes() == before

    create_client_keys(keys.laptop, "laptop", force=True)
    assert store.client_secret.read_bytes() != before
    assert len(list(keys.laptop.glob("client.key_secret.replaced-*"))) == 1


def test_one_existing_file_blocks_creation(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    (folder / "server.key_secret").write_text("kept\n")

    with pytest.raises(KeyExistsError, match="server.key_secret"):
        create_server_keys(folder)

    assert not (folder / "server.key").exists()
    assert (folder / "server.key_secret").read_text() == "kept\n"


def test_client_name_in_metadata(tmp_path: Path) -> None:
    files = create_client_keys(tmp_path / "keys", "build-box.lan")

    assert "name = build-box.lan" in files.secret.read_text()


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_invalid_client_name_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(SecurityError, match="invalid client name"):
        create_client_keys(tmp_path / "keys", name)


def test_authorize_same_key_again(keys: Machines) -> None:
    store = KeyStore(keys.server)
    target = authorize_client(keys.server, KeyStore(keys.laptop).client_public, name="laptop")

    assert target == store.clients_dir / "laptop.key"
    assert list(store.authorized_clients()) == ["laptop"]


def test_authorize_name_taken(keys: Machines) -> None:
    store = KeyStore(keys.server)
    laptop_key = store.authorized_clients()["laptop"]
    stranger_public = KeyStore(keys.stranger).client_public

    with pytest.raises(KeyExistsError, match="'laptop'"):
        authorize_client(keys.server, stranger_public, name="laptop")
    assert store.authorized_clients()["laptop"] == laptop_key

    authorize_client(keys.server, stranger_public, name="laptop", force=True)
    assert store.authorized_clients()["laptop"] != laptop_key
    assert len(list(store.clients_dir.glob("laptop.key.replaced-*"))) == 1


def test_authorize_default_name_from_file(keys: Machines, tmp_path: Path) -> None:
    copy = tmp_path / "stranger.key"
    shutil.copyfile(KeyStore(keys.stranger).client_public, copy)

    target = authorize_client(keys.server, copy)

    assert target.name == "stranger.key"


def test_authorize_secret_file_rejected(keys: Machines) -> None:
    with pytest.raises(SecurityError, match="contains a secret key"):
        authorize_client(keys.server, KeyStore(keys.stranger).client_secret, name="stranger")

    assert "stranger" not in KeyStore(keys.server).authorized_clients()


@pytest.mark.parametrize("content", ["", "curve\n    public-key = \"tooshort\"\n"])
def test_authorize_invalid_file_rejected(keys: Machines, tmp_path: Path,
                                         content: str) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text(content)

    with pytest.raises(SecurityError, match="bad.key"):
        authorize_client(keys.server, bad)


def test_revoke_unknown_client(keys: Machines) -> None:
    with pytest.raises(SecurityError, match=r"authorized: laptop"):
        revoke_client(keys.server, "nobody")


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_CONFIG_HOME applies on Linux only")
def test_default_store_in_config_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    assert KeyStore.default().folder == tmp_path / "famulus" / "keys"


@pytest.mark.parametrize("endpoint, expected", [
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.1.2.3:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://LocalHost:5555", True),
    ("tcp://[::1]:5555", True),
    ("tcp://::1:5555", True),
    ("tcp://[::ffff:127.0.0.1]:5555", True),
    ("tcp://127.0.0.1:*", True),
    ("tcp://*:5555", False),
    ("tcp://0.0.0.0:5555", False),
    ("tcp://[::]:5555", False),
    ("tcp://192.168.1.10:5555", False),
    ("tcp://[fe80::1%eth0]:5555", False),
    ("tcp://lo:5555", False),
    ("tcp://example.com:5555", False),
    ("tcp://localhost.evil.example:5555", False),
])
def test_is_loopback(endpoint: str, expected: bool) -> None:
    assert is_loopback(endpoint) is expected


@pytest.mark.parametrize("endpoint", [
    "ipc:///tmp/famulus/requests.sock",
    "tcp://127.0.0.1",
    "tcp://:5555",
    "tcp://127.0.0.1:65536",
    "tcp://127.0.0.1:port",
    "tcp://127.0.0.1:5555/path",
    "tcp://10.0.0.1;127.0.0.1:5555",
    "udp://127.0.0.1:5555",
    "",
])
def test_invalid_endpoint_rejected(endpoint: str) -> None:
    with pytest.raises(SecurityError, match="expected tcp://HOST:PORT"):
        check_tcp_endpoint(endpoint, curve_enabled=True)
    with pytest.raises(SecurityError, match="expected tcp://HOST:PORT"):
        is_loopback(endpoint)


@pytest.mark.parametrize("endpoint, curve_enabled, allowed", [
    ("tcp://127.0.0.1:5555", False, True),
    ("tcp://127.0.0.1:5555", True, True),
    ("tcp://[::1]:5555", False, True),
    ("tcp://0.0.0.0:5555", False, False),
    ("tcp://0.0.0.0:5555", True, True),
    ("tcp://*:5555", False, False),
    ("tcp://192.168.1.10:5555", False, False),
    ("tcp://192.168.1.10:5555", True, True),
])
def test_check_tcp_endpoint(endpoint: str, curve_enabled: bool, allowed: bool) -> None:
    if allowed:
        check_tcp_endpoint(endpoint, curve_enabled)
        return
    with pytest.raises(SecurityError) as info:
        check_tcp_endpoint(endpoint, curve_enabled)
    assert endpoint in str(info.value)
    assert "famulus keys server" in str(info.value)
