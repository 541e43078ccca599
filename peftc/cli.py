"""The `peftc` command. Each subcommand lives in peftc/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("compile", "inspect", "export", "plan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peftc", description="Compile PyTorch models with parameter-efficient adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        module = importlib.import_module(f"peftc.commands.{name}")
        module.add_parser(sub)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"peftc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
