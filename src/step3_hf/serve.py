"""`step3-serve`: transformers' own OpenAI-compatible server (`transformers serve`), able to load Step-3.

`transformers serve` builds a checkpoint's model class with `getattr(transformers, config.architectures[0])`, so a
plugin class is found only if it is an attribute of the `transformers` module object that the server's model
manager holds. This launcher imports `step3_hf`, sets the Step-3 classes under every architecture name a Step-3
checkpoint carries (ours and the official ones) on exactly that object, and hands the command line to the
`serve` command unchanged, with two defaults that suit Step-3: continuous batching on, and SDPA attention for it
(continuous batching accepts only SDPA, eager and flash kernels); and one check, a request longer than the
model's context gets HTTP 400 instead of running past it. Everything else is `transformers serve`:

    step3-serve path/to/checkpoint --port 8000            # the model is loaded at start and pinned
    step3-serve path/to/checkpoint --no-continuous-batching --device cuda:0
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

from .modeling_step3 import Step3ForCausalLM, Step3VLForCausalLM

# Architecture name in a config.json -> the class that loads it.
STEP3_ARCHITECTURES = {
    "Step3ForCausalLM": Step3ForCausalLM,
    "Step3TextForCausalLM": Step3ForCausalLM,  # what `save_pretrained` and the official release write
    "Step3VLForCausalLM": Step3VLForCausalLM,
    "Step3VLForConditionalGeneration": Step3VLForCausalLM,  # the official multimodal checkpoint
}


def expose_step3_to_server() -> None:
    """Make the Step-3 classes resolvable by the server's `getattr(transformers, architecture)`.

    The attributes are set on the module object that `transformers.cli.serving.model_manager` imported, not on
    whatever `sys.modules["transformers"]` is now: another import may have replaced that entry since.
    """
    from transformers.cli.serving import model_manager

    for name, model_class in STEP3_ARCHITECTURES.items():
        setattr(model_manager.transformers, name, model_class)


def refuse_requests_beyond_context() -> None:
    """Answer HTTP 400, before generation starts, to a request that does not fit the model's context.

    Step-3 uses plain RoPE, which runs past `max_position_embedding` without a sign; `transformers serve` checks no
    length. The check runs right after the server resolves the model of a request (`BaseHandler._resolve_model`,
    shared by every endpoint) and counts the prompt as the endpoint will: the chat template for `messages`, the
    plain tokenizer for a `prompt`. A prompt plus `max_tokens` beyond the context is refused too.
    """
    from transformers.cli.serving.utils import BaseHandler

    resolve_model = BaseHandler._resolve_model
    if getattr(resolve_model, "checks_context", False):
        return

    def resolve_model_within_context(self, body: dict):
        model_id, model, processor = resolve_model(self, body)
        _check_fits_context(body, model, processor)
        return model_id, model, processor

    resolve_model_within_context.checks_context = True
    BaseHandler._resolve_model = resolve_model_within_context


def _check_fits_context(body: dict, model, processor) -> None:
    from fastapi import HTTPException
    from transformers.cli.serving.utils import BaseHandler, Modality

    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        if "messages" in body:
            messages = BaseHandler.get_processor_inputs_from_messages(body["messages"], Modality.LLM)
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, tools=body.get("tools")
            )
            prompt_tokens = len(encoded["input_ids"])
        elif isinstance(body.get("prompt"), str):
            prompt_tokens = len(tokenizer(body["prompt"])["input_ids"])
        else:
            return
    except (TypeError, KeyError, ValueError, AttributeError):
        return  # a malformed request: the endpoint's own validation answers it
    context = model.config.get_text_config().max_position_embeddings
    if prompt_tokens >= context:
        raise HTTPException(
            status_code=400,
            detail=f"The prompt is {prompt_tokens} tokens; this model's context is {context} tokens.",
        )
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int) and prompt_tokens + max_tokens > context:
        raise HTTPException(
            status_code=400,
            detail=f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
            f"context of {context} tokens.",
        )


def _with_step3_defaults(args: list[str]) -> list[str]:
    args = list(args)
    if not any(a in ("--continuous-batching", "--no-continuous-batching") for a in args):
        args.append("--continuous-batching")
    continuous = "--no-continuous-batching" not in args
    if continuous and not any(a == "--attn-implementation" or a.startswith("--attn-implementation=") for a in args):
        args += ["--attn-implementation", "sdpa"]
    return args


def _serve_command():
    """transformers' `Serve` command, stopping its generation workers once the server has stopped.

    `transformers serve` leaves the continuous-batching worker thread running after uvicorn shuts down on
    SIGINT/SIGTERM, which keeps the process alive; this subclass stops it, so the process exits.
    """
    from transformers.cli.serve import Serve

    class Step3Serve(Serve):
        @functools.wraps(Serve.__init__)
        def __init__(self, *args, **kwargs):
            try:
                super().__init__(*args, **kwargs)
            finally:
                if getattr(self, "_generation_state", None) is not None:
                    self._generation_state.shutdown()
                if getattr(self, "_model_manager", None) is not None:
                    self._model_manager.shutdown()

    Step3Serve.__doc__ = (
        "transformers serve for Step-3 checkpoints (continuous batching and SDPA by default; requests longer than "
        "the model's context get HTTP 400).\n\n" + (Serve.__doc__ or "")
    )
    return Step3Serve


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `step3-serve`: `transformers serve` with Step-3 visible and Step-3 defaults."""
    import typer
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise SystemExit("step3-serve needs fastapi, uvicorn, pydantic and openai: pip install 'step3-hf[serve]'")
    try:
        expose_step3_to_server()
    except ModuleNotFoundError as err:  # transformers without the `transformers.cli.serving` package
        import transformers

        raise SystemExit(
            f"step3-serve wraps `transformers.cli.serving`, which transformers {transformers.__version__} lacks "
            f"({err}); upgrade transformers"
        ) from err
    refuse_requests_beyond_context()
    app = typer.Typer(add_completion=False)
    serve_command = _serve_command()
    app.command(help=serve_command.__doc__)(serve_command)
    args = _with_step3_defaults(sys.argv[1:] if argv is None else list(argv))
    app(args, prog_name="step3-serve")


if __name__ == "__main__":
    main()
