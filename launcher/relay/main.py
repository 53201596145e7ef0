"""`python -m launcher relay`: flags, start-up checks, serving and orderly shutdown."""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import ssl
import sys
import threading
from typing import Any, Optional

from hpc_common.owned_folders import try_lock
from hpc_common.retry_queues import DEFAULT_MAX_RETRIES
from hpc_common.tokens import TokenFileError, read_token_file
from launcher.errors import ConfigError

log = logging.getLogger("launcher.relay")
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


class RelayConfigError(ConfigError):
    """A relay setting is missing or wrong (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The relay's own flags (the launcher's common ones are added by launcher.cli)."""
    p.add_argument("--bind", required=True, metavar="HOST:PORT",
                   help="address to listen on, e.g. 10.0.0.1:8765 (no default: choose the interface)")
    p.add_argument("--token-file", required=True, metavar="FILE",
                   help="file holding the bearer token agents present (must be mode 0600)")
    p.add_argument("--cert", metavar="PEM", help="TLS certificate chain (with --key): serve HTTPS")
    p.add_argument("--key", metavar="PEM", help="TLS private key (with --cert)")
    p.add_argument("--lease-ttl", type=float, default=15.0,
                   help="seconds a lease lives without a heartbeat (default 15; agents extend every ttl/4)")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="seconds between the relay's registrations of the extractor for its agents "
                        "(env HEARTBEAT; default 60, inside Clowder v2's 300 s window)")
    p.add_argument("--max-wait", type=float, default=30.0, help="longest lease long-poll in seconds (default 30)")
    p.add_argument("--buffer", type=int, default=20,
                   help="unleased messages held from RabbitMQ at most (default 20)")
    p.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                   help="failed attempts (or expired leases) beyond which a message is dead-lettered "
                        f"(default {DEFAULT_MAX_RETRIES}, as pyclowder's MAX_RETRY)")
    p.add_argument("--retry-backoff", type=float, default=2.0,
                   help="seconds before a failed message is leasable again, doubling (default 2, max 60)")
    p.add_argument("--max-upload", type=int, default=50 << 30, metavar="BYTES",
                   help="largest request body forwarded to Clowder (default 50 GiB)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most (default 1024; an agent keeps about 6 open)")
    p.add_argument("--clowder-url", metavar="URL",
                   help="reach Clowder here instead of the message's host (env CLOWDER_URL)")
    p.add_argument("--public-url", metavar="URL",
                   help="base URL agents use for the relay (default: from each request's Host header)")


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise RelayConfigError(f"--bind {text!r}: expected HOST:PORT (e.g. 10.0.0.1:8765, [::1]:8765)")
    return host.strip("[]"), int(port)


def _tls(cert: Optional[str], key: Optional[str]) -> Optional[ssl.SSLContext]:
    if not cert and not key:
        return None
    if not cert or not key:
        raise RelayConfigError("--cert and --key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise RelayConfigError(f"cannot load the TLS certificate/key: {exc.__class__.__name__}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def _heartbeat(flag: Optional[float]) -> float:
    """Registration interval: --heartbeat, else HEARTBEAT from the environment (pyclowder's name), else 60."""
    raw = flag if flag is not None else os.environ.get("HEARTBEAT") or 60.0
    try:
        value = float(raw)
    except ValueError:
        raise RelayConfigError(f"HEARTBEAT={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise RelayConfigError("--heartbeat (HEARTBEAT) must be positive")
    return value


def _lock(folder: str) -> int:
    try:
        fd = try_lock(os.path.join(folder, "relay.lock"))
    except OSError as exc:
        raise RelayConfigError(f"cannot lock the state folder {folder}: {exc.strerror}") from None
    if fd is None:
        raise RelayConfigError(f"another relay already uses the state folder {folder}")
    return fd


def _raise_fd_limit(connections: int) -> None:
    """Lift the soft open-files limit toward the hard one: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # the lease table, the broker, upstream connections, logs
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open-files limit %d is below --max-connections %d plus room; raise `ulimit -Hn`",
                        new, connections)


def run(args: argparse.Namespace, state_dir: str, launcher_settings: Any = None) -> int:
    """Run the relay until SIGTERM/SIGINT; return the exit code."""
    from .broker import BrokerLink
    from .forward import Forwarder
    from .server import Relay, RelaySettings
    from .store import LeaseStore

    from launcher.settings import from_args

    conf = launcher_settings if launcher_settings is not None else from_args(args)
    uri, queue = conf.rabbitmq_uri, conf.rabbitmq_queue
    if not uri or not queue:
        raise RelayConfigError("the relay needs RABBITMQ_URI and RABBITMQ_QUEUE in its environment")
    host, port = _bind(args.bind)
    try:
        token = read_token_file(args.token_file)
    except TokenFileError as exc:
        raise RelayConfigError(str(exc)) from None
    if args.lease_ttl < 2 or args.buffer < 1 or args.max_retries < 0 or args.max_upload < 1:
        raise RelayConfigError("--lease-ttl must be >= 2, --buffer >= 1, --max-retries >= 0, --max-upload >= 1")
    heartbeat = _heartbeat(args.heartbeat)
    settings = RelaySettings(host=host, port=port, token=token, queue=queue, lease_ttl=args.lease_ttl,
                             heartbeat=heartbeat,
                             max_wait=args.max_wait, max_retries=args.max_retries, retry_backoff=args.retry_backoff,
                             max_upload=args.max_upload, max_connections=args.max_connections,
                             clowder_url=conf.clowder_url,
                             public_url=args.public_url, tls=_tls(args.cert, args.key))
    _raise_fd_limit(settings.max_connections)
    folder = os.path.join(state_dir, "relay-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in queue))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    lock_fd = _lock(folder)
    store = LeaseStore(os.path.join(folder, "leases.sqlite3"))
    store.set_meta("lease_ttl", repr(settings.lease_ttl))  # for launcher.backlog, which reads the table
    kept = store.grace_all(settings.lease_ttl)
    if kept:
        log.warning("%d lease(s) survived the last run; their agents have %.0fs to be heard from", kept,
                    settings.lease_ttl)
    broker = BrokerLink(uri, queue, store, buffer=args.buffer, relay_id=f"{os.uname().nodename}-{os.getpid()}",
                        internals=conf.relay_amqp_internals)
    relay = Relay(settings, store, broker, Forwarder(store, settings.max_upload, settings.clowder_url))
    try:
        bound = relay.bind()
    except OSError as exc:
        raise RelayConfigError(f"cannot listen on {args.bind}: {exc.strerror}") from None
    broker.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server = threading.Thread(target=relay.serve, name="relay-http", daemon=True)
    server.start()
    scheme = "https" if settings.tls else "http"
    log.warning("relay for queue %s listening on %s://%s:%d (state %s)", queue, scheme, bound[0], bound[1], folder)
    print(f"relay listening on {scheme}://{bound[0]}:{bound[1]}", flush=True)
    stop.wait()
    log.warning("stopping: no new leases; waiting messages go back to %s", queue)
    relay.shutdown()
    broker.stop()
    broker.join(timeout=15)
    handed = broker.hand_back()
    counts = store.counts()
    store.close()
    os.close(lock_fd)
    log.warning("stopped: %d message(s) handed back to RabbitMQ; %d lease(s) kept for the next start",
                handed, counts.get("leased", 0))
    return EXIT_OK


def main_from_cli(args: argparse.Namespace, state_dir: str, settings: Any = None) -> int:
    """launcher.cli's entry: run, turning configuration errors into exit 2 with a clear message."""
    if not logging.getLogger("launcher").handlers:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s relay %(levelname)s %(message)s")
    try:
        from launcher.settings import from_args

        settings = settings if settings is not None else from_args(args)
        logging.getLogger("launcher.relay").setLevel(logging.DEBUG if settings.relay_debug else logging.INFO)
        return run(args, state_dir, settings)
    except ConfigError as exc:  # RelayConfigError, or a bad setting
        print(f"launcher relay: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
