"""The temporary Prefect server of a run without PREFECT_API_URL, tied to this process's life.

Prefect starts its ephemeral API in a child process and stops it at exit; a killed run (SIGKILL,
OOM) never reaches that, and the server lives on as an orphan. Started here, from the main
thread, the child asks Linux to send it SIGTERM when its parent dies (PR_SET_PDEATHSIG), and
Prefect's own code finds this server as the one it would have started. Its address goes into
PREFECT_API_URL of this process's environment, which child processes (local Dask workers) inherit.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_reaped_ephemeral_server() -> bool:
    """Start Prefect's temporary server now, reaped with this process; False where it does not apply
    (a server is configured, not Linux, not the main thread: Prefect's own start then stands)."""
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False  # PR_SET_PDEATHSIG follows the spawning thread, not the process
    import prefect.server.api.server as server_module

    class ReapedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen = server_module.subprocess.Popen

            def with_death_signal(*args, **kwargs):
                kwargs.setdefault("preexec_fn", _die_with_parent)
                return popen(*args, **kwargs)

            server_module.subprocess.Popen = with_death_signal
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess.Popen = popen

    if None in server_module.SubprocessASGIServer._instances:  # Prefect started one already
        return False
    server = ReapedServer()
    server.start()  # registered as the instance every SubprocessASGIServer() returns
    # Processes started from here on (Dask's local workers) report to this server too, instead of
    # each starting a temporary server of its own.
    os.environ["PREFECT_API_URL"] = server.api_url
    return True
