"""`taxiway generate PROMPT`: run the engine in-process and print the model's answer."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt in this process",
                       description="Generate text for a prompt with the engine in this process.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (a user message)")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpu_engine.errors import TaxiwayError
    from taxiway import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop)
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": args.prompt})
            out = llm.chat(messages, params)[0]
        else:
            out = llm.generate(args.prompt, params)[0]
    except (TaxiwayError, ValueError) as exc:
        print(f"taxiway generate: {exc}", file=sys.stderr)
        return 1
    print(out.outputs[0].text)
    return 0
