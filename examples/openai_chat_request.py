"""Ask a running `step3-serve` for a chat completion with the `openai` client, then stream one.

    step3-serve step3-finetune-out/final --port 8000          # e.g. what examples/finetune_step3.py saved
                                                              # (full tuning; after LoRA serve `merged`, from --merge)
    python examples/openai_chat_request.py --model step3-finetune-out/final --prompt "the cat"

The model name must be the one the server was started with (it is pinned); any other name gets HTTP 400.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", required=True, help="the path or id given to step3-serve")
    parser.add_argument("--prompt", default="the cat")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": args.prompt}]
    reply = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    print("reply:", reply.choices[0].message.content)
    print("usage:", reply.usage)

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
