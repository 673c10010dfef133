"""The viewer: a Streamlit app over a run directory (`ne view RUN_DIR`).

`data` reads one neuron at a time from the run directory, `render` turns examples into HTML and the
dendrogram into a figure, `mnist` computes the MNIST pages, and `app` is the Streamlit script.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def launch_command(run_dir: str, host: str | None = None, port: int | None = None) -> list[str]:
    """The `streamlit run` command line serving `run_dir`; host and port default to the run's viewer config."""
    from ne.config import ViewerConfig
    from ne.errors import NeError
    from ne.viewer.data import RunData

    try:
        viewer = RunData(run_dir).config().viewer
    except NeError:
        viewer = ViewerConfig()  # the page itself explains what is wrong with the run directory
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host or viewer.host,
        "--server.port", str(port or viewer.port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--", str(run_dir),
    ]
