"""`nsa-explorer app` (also plain `nsa-explorer` and `make run`): start the Streamlit app.

With no argument the app opens the best shipped NSA sample model, on the GPU through the Triton
kernels when one is there and on the CPU through the reference otherwise; the app's sidebar says which
and why. The choices travel to the app through environment variables, so the app reads the same
settings whether Streamlit, a test or a browser session started it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

APP_SCRIPT = Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py"
# Read by app/cache.py; empty or unset means "decide at start-up".
ENV_CHECKPOINT = "NSA_EXPLORER_CHECKPOINT"
ENV_DEVICE = "NSA_EXPLORER_DEVICE"
# The app opens server-side paths only under configured roots (nsa_core.safe_paths).
ENV_ROOTS = "NSA_CHECKPOINT_ROOTS"
DEVICES = ("auto", "cpu", "cuda")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nsa-explorer app", description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="checkpoint to open: a shipped sample name (e.g. nsa-tiny), a directory or a "
        ".safetensors file (default: the best shipped NSA model)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: the GPU with the Triton kernels when there is one, else the CPU",
    )
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--address", default="localhost", help="address to bind (default localhost)")
    parser.add_argument("--headless", action="store_true", help="do not open a browser window")
    return parser.parse_args(argv)


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The `streamlit run` command line for the parsed arguments."""
    if not 0 < args.port < 65536:
        raise SystemExit(f"nsa-explorer app: --port must be in 1..65535, got {args.port}")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        f"--server.port={args.port}",
        f"--server.address={args.address}",
        f"--server.headless={'true' if args.headless else 'false'}",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
        # A research tool, not a deployment target: the toolbar offers only what a viewer needs.
        "--client.toolbarMode=viewer",
    ]


def app_environment(args: argparse.Namespace) -> dict[str, str]:
    """The process environment with the checkpoint and device choices for the app."""
    env = dict(os.environ)
    env[ENV_DEVICE] = args.device
    if args.checkpoint:
        env[ENV_CHECKPOINT] = args.checkpoint
        path = Path(args.checkpoint)
        if path.exists():
            # The operator named this checkpoint, so its folder becomes a root the app may open.
            root = str(path.resolve().parent)
            env[ENV_ROOTS] = os.pathsep.join(p for p in (env.get(ENV_ROOTS, ""), root) if p)
    else:
        env.pop(ENV_CHECKPOINT, None)
    return env


def cli(argv: list[str]) -> int:
    args = parse_args(argv)
    command = streamlit_command(args)
    print(f"nsa-explorer: serving the app on http://{args.address}:{args.port}", flush=True)
    try:
        return subprocess.call(command, env=app_environment(args))
    except KeyboardInterrupt:
        return 0
