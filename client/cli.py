"""``accordion generate``: stream a completion from a running server to stdout."""

from __future__ import annotations

import argparse
import os
import sys

from accordion.client.client import Client
from accordion.client.connection import TLSConfig
from accordion.client.results import ClientError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="accordion generate", description="Stream a completion from an accordion server.")
    ap.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    ap.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT (default %(default)s)")
    ap.add_argument("--api-key", default=None, help="API key (default: $ACCORDION_API_KEY)")
    ap.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default: what fits)")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--model", default="", help="model name to check against the server's")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    ap.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    ap.add_argument("--ca-cert", default=None)
    ap.add_argument("--client-cert", default=None)
    ap.add_argument("--client-key", default=None)
    ap.add_argument("--usage", action="store_true", help="print token usage to stderr at the end")
    return ap


def generate_cli(argv: list[str] | None = None) -> int:
    """Entry point of ``accordion generate``; returns the process exit code."""
    ns = _parser().parse_args(argv)
    prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    api_key = ns.api_key or os.environ.get("ACCORDION_API_KEY") or None
    tls: bool | TLSConfig = False
    if ns.tls or ns.ca_cert or ns.client_cert:
        tls = TLSConfig(ca_cert=ns.ca_cert, client_cert=ns.client_cert, client_key=ns.client_key)
    last = None
    try:
        with Client(ns.target, api_key=api_key, tls=tls, timeout=ns.timeout) as client:
            for chunk in client.stream(prompt, model=ns.model, max_tokens=ns.max_tokens, temperature=ns.temperature,
                                       top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed, stop=ns.stop):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except ClientError as e:
        sys.stdout.write("\n")
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("\n")
    if last is not None and ns.usage:
        u = last.usage
        print(f"[{last.finish_reason}] prompt={u.prompt_tokens} completion={u.completion_tokens} "
              f"cached={u.cached_tokens}", file=sys.stderr)
    if last is not None and last.finish_reason == "error":
        print(f"error: {last.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(generate_cli())
