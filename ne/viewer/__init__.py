"""The viewer: a Streamlit app over a run directory (`ne view RUN_DIR`).

`data` reads one neuron at a time from the run directory, `render` turns examples into HTML and the
dendrogram into a figure, `mnist` computes the MNIST pages, and `app` is the Streamlit script.
"""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

from ne.errors import ConfigError

APP = Path(__file__).with_name("app.py")


def launch_command(run_dir: str, host: str | None = None, port: int | None = None) -> list[str]:
    """The `streamlit run` command line serving `run_dir`; host and port default to the run's viewer config."""
    from ne.config import ViewerConfig
    from ne.errors import NeError
    from ne.rundir.reader import RunData

    try:
        viewer = RunData(run_dir).config().viewer
    except NeError:
        viewer = ViewerConfig()  # the page itself explains what is wrong with the run directory
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        viewer.host if host is None else host,
        "--server.port",
        str(viewer.port if port is None else port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--",
        str(run_dir),
    ]


def check_address(host: str, port: int) -> None:
    """An error with the reason when the viewer could not listen on host:port (checked before starting it)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port; choose one in 1..65535, for example 8501")
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(
            f"--host {host!r} is not an address this machine knows ({exc}); use 127.0.0.1, or "
            "0.0.0.0 to share the viewer"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use (another viewer?); pass --port with a free port, e.g. --port 8502"
                ) from None
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); use 127.0.0.1, 0.0.0.0 or an address of this machine"
            ) from None
