"""CURVE keys and client authorization for the bus's optional TCP endpoint.

Over ipc:// the runtime directory's mode (0700) limits the bus to one user. A TCP endpoint
has no such protection, so a bind beyond loopback requires CURVE: traffic is encrypted, and a
ZAP handler (`zmq.auth.thread.ThreadAuthenticator`) accepts only client public keys stored in
the `clients/` folder of the key store.

Key store layout (the daemon uses `<user config dir>/famulus/keys`)::

    server.key          server public key; copy it to every client machine
    server.key_secret   server secret key; never leaves this machine
    clients/NAME.key    public key of each authorized client
    client.key          this machine's own client public key; give it to the server's owner
    client.key_secret   this machine's own client secret key

The files are ZeroMQ certificates as written by `zmq.auth.create_certificates`. Folders get
mode 0700 and secret files mode 0600. Nothing here logs secret key material.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from famulus.daemon.paths import user_paths

logger = logging.getLogger(__name__)

# Commands named in error messages. The CLI must provide these spellings.
SERVER_KEYS_COMMAND = "famulus keys server"
CLIENT_KEYS_COMMAND = "famulus keys client --name NAME"
AUTHORIZE_COMMAND = "famulus keys authorize FILE --name NAME"

KEYS_FOLDER_NAME = "keys"
CLIENTS_FOLDER_NAME = "clients"
SERVER_BASENAME = "server"
CLIENT_BASENAME = "client"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
# pyzmq's Authenticator looks up an empty ZAP_DOMAIN as "*", so server sockets keep the
# default empty ZAP_DOMAIN.
CURVE_DOMAIN = "*"

PRIVATE_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
# A Z85-encoded CURVE key: 32 bytes become 40 characters.
Z85_KEY_LENGTH = 40

# Client names become file names in clients/, so they must not contain path separators or
# start with a dot.
CLIENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENDPOINT_PATTERN = re.compile(r"tcp://(?P<host>\[[^\[\]]+\]|[^\[\]/;@\s]+):(?P<port>[0-9]+|\*)")


class SecurityError(Exception):
    """A key, key folder or TCP endpoint is missing, invalid or unsafe."""


class KeyExistsError(SecurityError):
    """A key file already exists and `force` was not given."""


class KeyFiles(NamedTuple):
    """Paths of a certificate pair: the public file and the secret file."""

    public: Path
    secret: Path


@dataclass(frozen=True)
class KeyStore:
    """Layout of one key folder. The create_* functions below create the folder."""

    folder: Path

    @classmethod
    def default(cls) -> KeyStore:
        """Return the key store in the user's famulus config folder."""
        return cls(user_paths().config_dir / KEYS_FOLDER_NAME)

    @property
    def server_public(self) -> Path:
        return self.folder / f"{SERVER_BASENAME}{PUBLIC_SUFFIX}"

    @property
    def server_secret(self) -> Path:
        return self.folder / f"{SERVER_BASENAME}{SECRET_SUFFIX}"

    @property
    def clients_dir(self) -> Path:
        return self.folder / CLIENTS_FOLDER_NAME

    @property
    def client_public(self) -> Path:
        return self.folder / f"{CLIENT_BASENAME}{PUBLIC_SUFFIX}"

    @property
    def client_secret(self) -> Path:
        return self.folder / f"{CLIENT_BASENAME}{SECRET_SUFFIX}"

    def authorized_client_file(self, name: str) -> Path:
        return self.clients_dir / f"{validate_client_name(name)}{PUBLIC_SUFFIX}"

    def authorized_clients(self) -> dict[str, str]:
        """Map each authorized client's name to its Z85 public key."""
        if not self.clients_dir.is_dir():
            return {}
        clients = {}
        # The same glob as zmq.auth.load_certificates, so this lists what the ZAP handler uses.
        for path in sorted(self.clients_dir.glob(f"*{PUBLIC_SUFFIX}")):
            clients[path.name[: -len(PUBLIC_SUFFIX)]] = _load_public_key(path).decode("ascii")
        return clients


def validate_client_name(name: str) -> str:
    """Return `name` unchanged, or raise SecurityError if it cannot be a client file name."""
    if not CLIENT_NAME_PATTERN.fullmatch(name):
        raise SecurityError(
            f"invalid client name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def create_server_keys(folder: Path | str, *, force: bool = False) -> KeyFiles:
    """Create the server certificate pair and the `clients/` folder.

    Raises KeyExistsError if either server file exists, unless `force` is true. With
    `force`, the old files are renamed with a `.replaced-TIMESTAMP` suffix, not deleted.
    """
    store = KeyStore(Path(folder))
    _ensure_private_dir(store.folder)
    _ensure_private_dir(store.clients_dir)
    files = _create_key_pair(store.folder, SERVER_BASENAME, metadata=None, force=force,
                             fix=f"pass --force to `{SERVER_KEYS_COMMAND}` to replace them")
    logger.info("created server keys: public=%s secret=%s", files.public, files.secret)
    return files


def create_client_keys(folder: Path | str, name: str, *, force: bool = False) -> KeyFiles:
    """Create this machine's client certificate pair; `name` is stored in its metadata.

    Raises KeyExistsError if either client file exists, unless `force` is true. With
    `force`, the old files are renamed with a `.replaced-TIMESTAMP` suffix, not deleted.
    """
    validate_client_name(name)
    store = KeyStore(Path(folder))
    _ensure_private_dir(store.folder)
    files = _create_key_pair(store.folder, CLIENT_BASENAME, metadata={"name": name},
                             force=force, fix="pass --force to `famulus keys client` to "
                             "replace them, then get the new client.key authorized again")
    logger.info("created client keys for %r: public=%s secret=%s", name, files.public,
                files.secret)
    return files


def authorize_client(folder: Path | str, public_key_file: Path | str, *,
                     name: str | None = None, force: bool = False) -> Path:
    """Copy a client's public key file into `clients/` and return the copy's path.

    `name` defaults to the file name without `.key`. Authorizing the same key again under
    the same name does nothing. Another key under that name raises KeyExistsError unless
    `force` is true, which renames the old file with a `.replaced-TIMESTAMP` suffix.
    A running CurveServer accepts the key after its `reload()`.
    """
    source = Path(public_key_file)
    store = KeyStore(Path(folder))
    if name is None:
        name = source.name[: -len(PUBLIC_SUFFIX)] if source.name.endswith(
            PUBLIC_SUFFIX) else source.stem
    target = store.authorized_client_file(name)
    public_key = _load_client_public_key(source)

    _ensure_private_dir(store.folder)
    _ensure_private_dir(store.clients_dir)
    if target.exists():
        if _load_public_key(target) == public_key:
            logger.info("client %r is already authorized with this key: %s", name, target)
            return target
        if not force:
            raise KeyExistsError(
                f"another key is already authorized as {name!r} in {target}; choose another "
                "name, or pass --force to replace it"
            )
        _move_aside(target, "replaced")

    # Copy under a name that the ZAP handler's *.key glob skips, then link it into place,
    # so a reload never reads a half-written file and an existing file is never overwritten.
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, staging)
    try:
        os.chmod(staging, PUBLIC_FILE_MODE)
        _link_new(staging, target, fix="run the command again")
    finally:
        staging.unlink(missing_ok=True)
    logger.info("authorized client %r: %s", name, target)
    return target


def revoke_client(folder: Path | str, name: str) -> Path:
    """Rename `clients/NAME.key` with a `.revoked-TIMESTAMP` suffix and return the new path.

    A running CurveServer rejects the key for new connections after its `reload()`.
    """
    store = KeyStore(Path(folder))
    target = store.authorized_client_file(name)
    if not target.exists():
        known = ", ".join(store.authorized_clients()) or "none"
        raise SecurityError(
            f"no client named {name!r} is authorized in {store.clients_dir} "
            f"(authorized: {known})"
        )
    revoked = _move_aside(target, "revoked")
    logger.info("revoked client %r: moved %s to %s", name, target, revoked)
    return revoked


def is_loopback(endpoint: str) -> bool:
    """Return whether a `tcp://HOST:PORT` endpoint binds only to the loopback interface.

    Loopback means 127.0.0.0/8, ::1 (also IPv4-mapped) and the name `localhost`. The
    wildcards `*`, 0.0.0.0 and ::, other addresses, host names and interface names (even
    `lo`) count as not loopback. Raises SecurityError if the endpoint is not tcp://HOST:PORT.
    """
    host = _split_tcp_endpoint(endpoint)[0]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_tcp_endpoint(endpoint: str, curve_enabled: bool) -> None:
    """Raise SecurityError unless `endpoint` is tcp://HOST:PORT that is safe to bind.

    A non-loopback bind is safe only with CURVE. A loopback bind passes without CURVE.
    NOTE: every local user can connect to a loopback TCP port, unlike the ipc:// sockets
    in the 0700 runtime directory, so enable CURVE on shared machines.
    """
    if is_loopback(endpoint) or curve_enabled:
        return
    raise SecurityError(
        f"TCP endpoint {endpoint} accepts connections from other machines, so it requires "
        f"CURVE encryption: enable CURVE and create server keys with `{SERVER_KEYS_COMMAND}`, "
        "or bind to a loopback address such as tcp://127.0.0.1:PORT"
    )


class CurveServer:
    """ZAP authentication and CURVE server settings for the sockets of one zmq.Context.

    libzmq sends each CURVE client's public key to the ZAP handler of the socket's own
    context. With no handler there, libzmq 4.3.5 accepts any client that completes the
    handshake, so `apply` rejects sockets of another context and sockets after `stop`.

    Call `stop()` before terminating the context, because the authenticator's sockets
    would block `Context.term()`.
    """

    def __init__(self, context: zmq.Context[Any], keys_folder: Path | str) -> None:
        self.context = context
        self.store = KeyStore(Path(keys_folder))
        self._public_key, self._secret_key = _load_secret_certificate(
            self.store.server_secret, fix=f"create server keys with `{SERVER_KEYS_COMMAND}`")
        self._check_clients_dir()
        self._authenticator = ThreadAuthenticator(context)
        try:
            self._authenticator.start()
        except zmq.ZMQError as exc:
            # Only one ZAP handler can bind inproc://zeromq.zap.01 in a context.
            self._authenticator.stop()
            raise SecurityError(
                f"failed to start the ZAP authenticator: {exc}; a context can have only one "
                "ZAP handler, so create one CurveServer per zmq.Context"
            ) from exc
        try:
            self.reload()
        except SecurityError:
            self._authenticator.stop()
            raise

    @property
    def running(self) -> bool:
        return self._authenticator.is_alive()

    def reload(self) -> int:
        """Reread `clients/` so that added and revoked keys apply, and return the key count.

        NOTE: ZAP runs only during the handshake. A revoked client stays connected until
        its connection drops or the server socket is closed.
        """
        self._check_clients_dir()
        try:
            # configure_curve logs a load failure and keeps the old keys (none at first,
            # which rejects every client). Loading here first turns that into an error.
            count = len(zmq.auth.load_certificates(self.store.clients_dir))
        except (OSError, ValueError) as exc:
            raise SecurityError(
                f"failed to load authorized client keys from {self.store.clients_dir}: "
                f"{exc}; remove or replace that file"
            ) from exc
        self._authenticator.configure_curve(domain=CURVE_DOMAIN,
                                            location=str(self.store.clients_dir))
        if count:
            logger.info("CURVE: %d authorized client keys in %s", count,
                        self.store.clients_dir)
        else:
            logger.warning("CURVE: no authorized client keys in %s, so every client is "
                           "rejected; authorize one with `%s`", self.store.clients_dir,
                           AUTHORIZE_COMMAND)
        return count

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make `socket` a CURVE server with the server keys. Call it before `bind`."""
        if not self.running:
            raise SecurityError("the CURVE authenticator is stopped, so it cannot check "
                                "clients; create a new CurveServer")
        if socket.context is not self.context:
            raise SecurityError("the socket belongs to another zmq.Context than this "
                                "CurveServer, so no ZAP handler would check its clients; "
                                "create the socket from CurveServer.context")
        socket.curve_secretkey = self._secret_key
        socket.curve_publickey = self._public_key
        socket.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread, so new CURVE handshakes on applied sockets fail."""
        self._authenticator.stop()

    def __enter__(self) -> CurveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_clients_dir(self) -> None:
        if not self.store.clients_dir.is_dir():
            raise SecurityError(
                f"authorized client folder {self.store.clients_dir} does not exist; "
                f"create it with `{SERVER_KEYS_COMMAND}`"
            )


def apply_client_curve(socket: zmq.Socket[Any], keys_folder: Path | str) -> None:
    """Set a client socket's CURVE keys from `keys_folder`. Call it before `connect`.

    The folder needs the server's public key as `server.key` and this machine's
    `client.key_secret`.
    """
    store = KeyStore(Path(keys_folder))
    server_key = _load_public_key(
        store.server_public,
        fix=f"copy server.key from the server's key folder to {store.server_public}")
    public_key, secret_key = _load_secret_certificate(
        store.client_secret, fix=f"create client keys with `{CLIENT_KEYS_COMMAND}`")
    socket.curve_serverkey = server_key
    socket.curve_publickey = public_key
    socket.curve_secretkey = secret_key


def _split_tcp_endpoint(endpoint: str) -> tuple[str, str]:
    """Return (host, port) of a tcp://HOST:PORT endpoint, or raise SecurityError."""
    match = ENDPOINT_PATTERN.fullmatch(endpoint)
    port = match["port"] if match else ""
    if match is None or (port != "*" and int(port) > 65535):
        raise SecurityError(
            f"invalid TCP endpoint {endpoint!r}: expected tcp://HOST:PORT with a port from "
            "0 to 65535, for example tcp://127.0.0.1:5555 or tcp://[::1]:5555"
        )
    return match["host"], port


def _ensure_private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or check that an existing one is ours and set 0700."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SecurityError(f"key folder {path} is not a plain directory; remove it")
    if info.st_uid != os.getuid():
        raise SecurityError(
            f"key folder {path} belongs to UID {info.st_uid}, not to you (UID {os.getuid()}); "
            "use a folder of your own"
        )
    if stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
        logger.info("set mode 0700 on key folder %s (was %o)", path, stat.S_IMODE(info.st_mode))
        os.chmod(path, PRIVATE_DIR_MODE)


def _create_key_pair(folder: Path, basename: str, *, metadata: dict[str, str] | None,
                     force: bool, fix: str) -> KeyFiles:
    target = KeyFiles(folder / f"{basename}{PUBLIC_SUFFIX}",
                      folder / f"{basename}{SECRET_SUFFIX}")
    existing = [path for path in target if os.path.lexists(path)]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise KeyExistsError(f"{' and '.join(map(str, existing))} already {verb}; {fix}")

    # create_certificates writes with the process umask, so the files are made in a 0700
    # staging folder (mkdtemp's mode) and get their final modes before they are linked in.
    staging = Path(tempfile.mkdtemp(prefix=f".{basename}-new-", dir=folder))
    try:
        public, secret = zmq.auth.create_certificates(staging, basename, metadata)
        os.chmod(secret, SECRET_FILE_MODE)
        os.chmod(public, PUBLIC_FILE_MODE)
        for path in existing:
            _move_aside(path, "replaced")
        _link_new(Path(public), target.public, fix=fix)
        try:
            _link_new(Path(secret), target.secret, fix=fix)
        except KeyExistsError:
            # Another process created the secret file meanwhile. Keep its pair consistent.
            target.public.unlink()
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _link_new(source: Path, target: Path, *, fix: str) -> None:
    """Hard-link `source` to `target`, raising KeyExistsError instead of overwriting."""
    try:
        os.link(source, target)
    except FileExistsError as exc:
        raise KeyExistsError(f"{target} already exists; {fix}") from exc


def _move_aside(path: Path, reason: str) -> Path:
    """Rename `path` with a `.REASON-TIMESTAMP` suffix that the *.key glob does not match."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    counter = 1
    while os.path.lexists(target):
        counter += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{counter}")
    os.rename(path, target)
    logger.info("renamed old key file %s to %s", path, target)
    return target


def _read_certificate(path: Path, fix: str) -> tuple[bytes, bytes | None]:
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise SecurityError(f"key file {path} is missing or unreadable ({exc}); {fix}") from exc
    except ValueError as exc:
        raise SecurityError(f"key file {path} contains no public key; {fix}") from exc
    _check_z85_key(public_key, path, "public", fix)
    if secret_key is not None:
        _check_z85_key(secret_key, path, "secret", fix)
    return public_key, secret_key


def _check_z85_key(key: bytes, path: Path, kind: str, fix: str) -> None:
    # The message names the length only: the key text itself may be secret.
    valid = len(key) == Z85_KEY_LENGTH
    if valid:
        try:
            z85.decode(key)
        except (ValueError, KeyError, struct.error):
            valid = False
    if not valid:
        raise SecurityError(f"key file {path} contains an invalid {kind} key ({len(key)} "
                            f"characters, expected {Z85_KEY_LENGTH} Z85 characters); {fix}")


def _load_public_key(path: Path, fix: str = "replace the file with a valid key file") -> bytes:
    return _read_certificate(path, fix)[0]


def _load_client_public_key(path: Path) -> bytes:
    fix = "authorize the client.key file that `famulus keys client` wrote on the client"
    public_key, secret_key = _read_certificate(path, fix)
    if secret_key is not None:
        raise SecurityError(
            f"{path} contains a secret key; {fix}, and keep client.key_secret on the client"
        )
    return public_key


def _load_secret_certificate(path: Path, fix: str) -> tuple[bytes, bytes]:
    """Return (public key, secret key) from a secret file that only its owner can read."""
    public_key, secret_key = _read_certificate(path, fix)
    if secret_key is None:
        raise SecurityError(f"key file {path} contains no secret key; {fix}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"secret key file {path} has mode {mode:o}, so other users can read it; run "
            f"`chmod 600 {path}`, and replace the keys if others may have copied it"
        )
    return public_key, secret_key
