"""Fixtures for the fault tests: worker subprocess environments that can import the autotuner's probe stem, and a
throwaway PostgreSQL server (initdb into a temporary folder, loopback only, trust auth, stopped and removed after).

The server binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin; `.ci/run` installs Debian's
package when they are missing and sets DSKC_TEST_POSTGRES=required, so in CI a missing server or driver fails the
PostgreSQL tests instead of skipping them. initdb refuses to run as root: as root the cluster belongs to the
`postgres` user (created by the package) or `nobody`, and its commands run through runuser.
"""
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

AUTOTUNE_TESTS = Path(__file__).parents[1] / "autotune"     # probe_stem.py: the autotuner tests' small stem
if str(AUTOTUNE_TESTS) not in sys.path:
    sys.path.insert(0, str(AUTOTUNE_TESTS))


@pytest.fixture
def worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(AUTOTUNE_TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p])
    return env


def _server_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def _unavailable(why: str):
    if os.environ.get("DSKC_TEST_POSTGRES") == "required":
        pytest.fail(f"PostgreSQL is required here (DSKC_TEST_POSTGRES=required) but {why}")
    pytest.skip(f"{why}; `.ci/postgres.sh` installs the server, pip install 'psycopg[binary]' the driver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    def __init__(self, root: Path, user: str | None):
        self.root, self.user, self.port = root, user, _free_port()
        self.data = root / "data"

    def run(self, *cmd: str) -> None:
        full = (["runuser", "-u", self.user, "--"] if self.user else []) + list(cmd)
        proc = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = (self.root / "server.log").read_text()[-2000:] if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]} {log}")

    def start(self, initdb: str, pg_ctl: str) -> None:
        self.run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=50"
        self.run(pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "start")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this test session: (cluster). Skipped (or failed, in CI) without the binaries."""
    initdb, pg_ctl = _server_bin("initdb"), _server_bin("pg_ctl")
    if not (initdb and pg_ctl):
        _unavailable("the server binaries (initdb, pg_ctl) are not on PATH nor in /usr/lib/postgresql/*/bin")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed")
    user = None
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            _unavailable("initdb cannot run as root and there is no `postgres`/`nobody` user with runuser")
    root = Path(tempfile.mkdtemp(prefix="dskc-pg-"))     # under /tmp: the server's user must reach it
    if user:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
    cluster = _Cluster(root, user)
    try:
        cluster.start(initdb, pg_ctl)
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.run(pg_ctl, "-D", str(cluster.data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the session's server, as a SQLAlchemy URL."""
    import psycopg

    name = f"dskc_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.url(name)
