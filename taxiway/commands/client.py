"""`taxiway client "prompt"`: stream an answer from a running gateway."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("client", help="stream an answer from a running taxiway gateway",
                              description="Send one prompt to a gateway and print the answer as "
                                          "it streams.")
    p.add_argument("prompt", help="the prompt (a user chat message unless --raw)")
    p.add_argument("--address", default="127.0.0.1:50051", help="the gateway (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="the API key to send (default: $TAXIWAY_API_KEY; none if unset)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (system CAs unless --ca)")
    p.add_argument("--ca", default=None, metavar="PEM", help="CA bundle that signed the gateway's "
                                                            "certificate (implies --tls)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    p.add_argument("--system", default=None, help="a system message to put first")
    p.add_argument("--max-tokens", type=int, default=256, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds (default: %(default)s)")
    p.add_argument("--usage", action="store_true", help="print token counts to stderr at the end")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    from services.common.proto import pb

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                 stop=args.stop)
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    if args.raw:
        return pb.GenerateRequest(text=args.prompt, sampling=sampling)
    turns = ([pb.ChatMessage(role="system", content=args.system)] if args.system else [])
    turns.append(pb.ChatMessage(role="user", content=args.prompt))
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=turns), sampling=sampling)


def open_channel(args: argparse.Namespace):
    """The channel to the gateway: TLS with --tls/--ca, the API key on every call."""
    import os

    import grpc

    from services.common.auth import with_credential

    if args.tls or args.ca:
        root = open(args.ca, "rb").read() if args.ca else None
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=root))
    else:
        channel = grpc.insecure_channel(args.address)
    return with_credential(channel, args.api_key or os.environ.get("TAXIWAY_API_KEY"))


def run(args: argparse.Namespace) -> int:
    import grpc

    from services.common.proto import Stub, pb

    with open_channel(args) as channel:
        stub = Stub(channel, "Gateway")
        last = None
        try:
            for chunk in stub.Generate(build_request(args), timeout=args.timeout):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except KeyboardInterrupt:
            return 130
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print()
    if args.usage and last is not None:
        u = last.usage
        print(f"[{pb.FinishReason.Name(last.finish_reason)}; prompt {u.prompt_tokens}, completion "
              f"{u.completion_tokens}, cached {u.cached_tokens} tokens]", file=sys.stderr)
    return 0
