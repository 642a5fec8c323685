"""A throwaway PostgreSQL server on 127.0.0.1, for the tests and the feedback load run.

Debian's ``postgresql`` package puts its server binaries in
``/usr/lib/postgresql/<version>/bin`` (not on PATH); :func:`find_bin_dir` looks there, in
``$GRADUNC_POSTGRES_BIN`` and on PATH. :class:`LocalPostgres` runs ``initdb`` in a fresh
temporary directory, starts ``postgres`` listening on a loopback TCP port only (no Unix
socket, trust authentication for the one local superuser), and can stop and restart the
same cluster on the same port - which is how the fault tests take the database away from
a running service and give it back. PostgreSQL refuses to run as root, so under root the
cluster belongs to the ``postgres`` account the package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LocalPostgres", "PostgresUnavailable", "find_bin_dir"]

SUPERUSER = "gradunc"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or they cannot be run; the message says why."""


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``postgres``, newest version first."""
    candidates: list[Path] = []
    if configured := os.environ.get("GRADUNC_POSTGRES_BIN"):
        candidates.append(Path(configured))
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres) found in $GRADUNC_POSTGRES_BIN, "
        "on PATH or in /usr/lib/postgresql/*/bin; install Debian's package: "
        "apt-get install -y postgresql"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalPostgres:
    """One PostgreSQL cluster in a temporary directory, served on 127.0.0.1:``port``."""

    def __init__(self, *, bin_dir: Path | None = None, fsync: bool = True) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = _free_port()
        self.fsync = fsync
        self.base = Path(tempfile.mkdtemp(prefix="gradunc-postgres-"))
        self.data_dir = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self._user: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root, and there is no 'postgres' account to run the server "
                    "as (PostgreSQL refuses root)"
                ) from None
            self._user = "postgres"
            os.chown(self.base, account.pw_uid, account.pw_gid)
        self._initdb()

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            user=self._user,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed with code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-instructions",
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 60) -> LocalPostgres:
        """Start the server (again, after :meth:`stop`) and wait until it accepts queries."""
        if self.running:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes it until it stops
        if self._user is not None:
            account = pwd.getpwnam(self._user)
            os.chown(self.log_path, account.pw_uid, account.pw_gid)
        self._process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                f"fsync={'on' if self.fsync else 'off'}",
                "-c",
                "max_connections=100",
            ],
            user=self._user,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._accepts_queries():
            if self._process.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with code {self._process.returncode}: "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresUnavailable(f"postgres did not accept queries in {timeout_s} s")
            time.sleep(0.1)
        return self

    def _accepts_queries(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user=SUPERUSER,
                dbname="postgres",
                connect_timeout=2,
            ) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self, timeout_s: float = 60) -> None:
        """Fast shutdown (SIGINT): sessions are disconnected, committed work is kept."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=timeout_s)

    def create_database(self, name: str) -> str:
        """Create ``name`` (a fresh, empty database) and return its URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()
