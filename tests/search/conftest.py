"""A real, throwaway PostgreSQL server for the storage tests (Debian's `postgresql` package; `.ci/run` installs it).

Started once per session on a free port of 127.0.0.1 with password authentication, so the tests go through
the same path as a user's `storage: postgresql://USER:PASSWORD@HOST/DB`; stopped and deleted at the end.
"""
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from typing import List, Optional

import pytest

from cluster.local import free_port

PG_USER, PG_DB = "peft", "peft_search"
SERVER_OS_USER = "postgres"   # initdb and postgres refuse to run as root


def postgres_bin_dir() -> Optional[str]:
    """The directory of initdb, pg_ctl, postgres and psql: PATH first, then Debian's versioned directories."""
    found = shutil.which("initdb")
    if found:   # Debian puts none of them on PATH; a link (e.g. /usr/local/bin/initdb) points into the real one
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda path: int(path.split("/")[-3]) if path.split("/")[-3].isdigit() else 0)
    return os.path.dirname(versions[-1]) if versions else None


def _as_server_user() -> List[str]:
    """The command prefix that runs the server's tools as an unprivileged user when the tests run as root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_OS_USER)
    except KeyError:   # a bare image without Debian's package scripts: make the user the package would
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_OS_USER],
                       check=True)
    return ["runuser", "-u", SERVER_OS_USER, "--"]


def _run(command: List[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")


class PostgresServer:
    """One initdb'd cluster in a temporary directory; `url` reaches its database as a password-holding role."""

    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.prefix = _as_server_user()
        # not pytest's tmp_path: its parent is private to root, and the server runs as another user
        self.base = tempfile.mkdtemp(prefix="peft-pg-")
        self.data = os.path.join(self.base, "data")
        self.password = "pw" + secrets.token_hex(12)   # distinctive, so a search of the run directory finds any copy
        self.port = 0
        if self.prefix:
            owner = pwd.getpwnam(SERVER_OS_USER)
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    def tool(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    def start(self) -> None:
        superuser_pw = os.path.join(self.base, "superuser.pw")   # initdb wants one to enable password auth
        with open(superuser_pw, "w") as handle:
            handle.write(secrets.token_hex(16))
        if self.prefix:
            os.chown(superuser_pw, pwd.getpwnam(SERVER_OS_USER).pw_uid, -1)
        # local (socket) connections trusted: the fixture creates the role; TCP needs the password, as for users
        _run(self.prefix + [self.tool("initdb"), "-D", self.data, "-U", "postgres", "-E", "UTF8", "--no-instructions",
                            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={superuser_pw}"])
        for attempt in range(3):   # the free port may be taken between free_port() and the server's bind
            self.port = free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off"   # fsync off: a throwaway server
            proc = subprocess.run(self.prefix + [self.tool("pg_ctl"), "-D", self.data, "-l",
                                                 os.path.join(self.base, "server.log"), "-o", options, "-w", "-t", "60",
                                                 "start"], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}{self.server_log()}")
        self.psql(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{self.password}'", f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")

    def psql(self, *statements: str) -> None:
        command = [self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.base, "-p", str(self.port),
                   "-U", "postgres", "-d", "postgres"]
        for statement in statements:
            command += ["-c", statement]
        _run(self.prefix + command)

    def server_log(self) -> str:
        try:
            with open(os.path.join(self.base, "server.log")) as handle:
                return handle.read()[-3000:]
        except OSError:
            return ""

    def url(self, password: Optional[str] = None, database: str = PG_DB) -> str:
        return f"postgresql://{PG_USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self.prefix + [self.tool("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL server (PostgresServer); the tests that use it skip when no server binaries exist."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                    "install Debian's `postgresql` package (.ci/run does)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """`postgresql://USER:PASSWORD@127.0.0.1:PORT/DB` of the session's server."""
    return postgres_server.url()
