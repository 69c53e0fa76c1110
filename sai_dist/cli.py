"""``sai-dist``: the command-line entry point.

Subcommands live in their own modules and are imported only when used, so ``sai-dist
memory`` never imports the training stack and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, help line)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sai_dist.train.cli", "train a small GPT on an offline corpus (single process or distributed)"),
    "memory": ("sai_dist.memory.cli", "optimizer-state memory accounting and a per-device planner"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sai-dist", description="SGD-SaI, exact under every sharding.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_line) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_line, description=help_line)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        parser = argparse.ArgumentParser(prog=f"sai-dist {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(argv[1:])) or 0)
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
