"""`model-swap`, the user's command line: serve, look at and change what the store holds, chat.

Exit codes: 0 done, 1 the store answered an error (shown as its code and message), 2 a usage
error, 3 the store could not be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Mapping, Sequence

from rich.console import Console

from model_swap.cli import add_setting, settings_parser
from model_swap.commands import admin, chat, events, serve, views
from model_swap.commands.client import StoreClient, StoreError, StoreUnreachable

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130


def _after_the_command() -> argparse.ArgumentParser:
    """--url, --api-key and --json again after the command; one left out keeps its value from before it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=argparse.SUPPRESS, metavar="MODEL_SWAP_URL", help="the store's address")
    p.add_argument("--api-key", default=argparse.SUPPRESS, metavar="STORE_API_KEY", help="the store's key")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the store's JSON answer instead of tables")
    return p


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = settings_parser("model-swap", "Serve, inspect and switch the models of a model-swap store, and chat.")
    add_setting(parser, env, "--url", "MODEL_SWAP_URL", DEFAULT_URL, "the store's address")
    add_setting(parser, env, "--api-key", "STORE_API_KEY", None, "the store's key, if it has one", secret=True)
    parser.add_argument("--json", action="store_true", help="print the store's JSON answer instead of tables")
    common = _after_the_command()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=description, description=description)

    serve.add_arguments(command("serve", "start the worker and the store with the real models (like "
                                         "scripts/serve.sh) and keep them running until Ctrl-C"), env)
    command("ps", "per worker: the models in memory (memory, streams, keep-alive left) and the disk cache")
    command("list", "the store's models: size, aliases and where each is")
    for name, what in (("load", "put MODEL in the worker's memory now (transferring it first if needed)"),
                       ("unload", "unload MODEL from memory once its streams end; its file stays cached"),
                       ("evict", "unload MODEL and delete its file from the worker's disk"),
                       ("switch", "make MODEL resident now, draining what must go, and print the worker's "
                                  "memory before and after")):
        command(name, what).add_argument("model", metavar="MODEL")
    sub.choices["switch"].add_argument("--exclusive", action="store_true",
                                       help="unload every other (unpinned) model too, even if they all fit")
    c = command("chat", "chat with MODEL, streaming; /switch OTHER continues the conversation on another model")
    c.add_argument("model", metavar="MODEL", nargs="?",
                   help="the model to start with (default: the preset's, else the session's last)")
    c.add_argument("--session", help="continue this session id (default: a new one)")
    c.add_argument("--preset", help="a preset from the store's models config (system prompt, model, sampling)")
    c.add_argument("--max-tokens", type=int, help="longest answer in tokens (default: the store's)")
    e = command("events", "follow what the store does (transfers with a progress bar, loads, unloads)")
    e.add_argument("--until", metavar="KIND", help="stop after the first event of this kind (e.g. loaded)")
    return parser


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Carry out one parsed command."""
    if args.command == "serve":
        return serve.serve(args, out, err)
    client = StoreClient(args.url, args.api_key)
    quiet = Console(file=io.StringIO()) if args.json else out  # --json: only the JSON on stdout
    if args.command == "ps":
        answer = views.show_ps(client, quiet)
    elif args.command == "list":
        answer = views.show_list(client, quiet)
    elif args.command in ("load", "unload", "evict"):
        answer = admin.change(client, quiet, args.command, args.model)
    elif args.command == "switch":
        answer = admin.switch(client, quiet, args.model, args.exclusive)
    elif args.command == "chat":
        return chat.Chat(client, out, err, args.model, args.session, args.max_tokens, args.preset).run()
    else:
        return events.follow(client, out, err, args.until, as_json=args.json)
    if args.json:
        out.file.write(json.dumps(answer, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    out, err = Console(), Console(stderr=True)
    args = build_parser(env).parse_args(argv)
    try:
        return run(args, out, err)
    except StoreError as failure:
        err.print(f"[red]error[/red] {failure.code}: {failure.message}", highlight=False)
        return EXIT_ERROR
    except StoreUnreachable as failure:
        err.print(f"[red]error[/red] {failure}", highlight=False)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
