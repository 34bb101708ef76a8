"""Prefect flows and the `lift3d` command line: the entry points."""
import os

# Runs need no Prefect server: the ephemeral API starts in a subprocess. On a busy 2-core machine it
# can need longer than Prefect's default 20 s to come up; telemetry is off (no network here).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
