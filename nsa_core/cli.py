"""`nsa-explorer`: with no command, opens the app; `nsa-explorer COMMAND --help` for the others.

Each command lives in its own module and exposes `cli(argv) -> int`; modules load only when used,
so `nsa-explorer train` never imports Streamlit and the app never imports the trainer.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "app": ("nsa_core.launch", "open the Streamlit app (the default)"),
    "train": ("nsa_core.training", "train an NSALM from a recipe"),
    "niah": ("nsa_core.niah", "needle-in-a-haystack sweep of a checkpoint"),
    "trace": ("nsa_core.trace_cli", "trace a text through a checkpoint and summarise it"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.splitlines()[0] + "\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<7} {help_text}")
        return 0
    name, rest = (argv[0], argv[1:]) if argv and argv[0] in COMMANDS else ("app", argv)
    module = importlib.import_module(COMMANDS[name][0])
    return module.cli(rest)


if __name__ == "__main__":
    sys.exit(main())
