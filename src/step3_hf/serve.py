"""`step3-serve`: transformers' own OpenAI-compatible server (`transformers serve`), able to load Step-3.

    step3-serve path/to/checkpoint --port 8000            # the model is loaded at start and pinned
    step3-serve path/to/checkpoint --no-continuous-batching --device cuda:0

Everything is `transformers serve`, with four additions:

- the Step-3 classes are visible to the server, which builds a checkpoint's model class with
  `getattr(transformers, config.architectures[0])` (in its own model process since transformers 5.25: that process
  re-imports this module, which sets them again);
- the app the server builds gets `RequestValidationMiddleware`: a malformed request gets HTTP 422 naming the field,
  one that does not fit the model's context HTTP 400 (see `step3_hf.request_validation`);
- a `step3_vl` checkpoint that ships its processor is served with images: OpenAI `image_url` content parts given as
  data URLs (never fetched: any other URL is refused) reach `Step3VLForConditionalGeneration` through the processor;
  transformers' server generates for image-text models one request at a time;
- Step-3 defaults: continuous batching on, on Step-3's MFA decode kernel where it runs (a CUDA GPU with Triton:
  `--attn-implementation mfa_decode`, which batches on `mfa_paged`), else on SDPA.

The server is reached through two names of transformers' CLI package, `transformers.cli.serve.Serve` and
`transformers.cli.serving.server.build_server`; `main` checks for both at start and, if either is missing, exits
with one line naming the transformers versions this package supports (docs/compatibility.md).
"""

import functools
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires

import transformers

from .kernels import MFA_DECODE_ATTENTION, decode_kernel_preferred
from .modeling_step3 import Step3ForCausalLM, Step3VLForCausalLM
from .modeling_step3_vl import Step3VLForConditionalGeneration
from .processing_step3_vl import Step3VLProcessor
from .request_validation import INVALID, RequestError, RequestValidationMiddleware, ServedLimits

def processor_or_tokenizer(path: str):
    """The checkpoint's processor, or its tokenizer where it ships no processor files."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError):  # no processor files: a tokenizer alone
        return AutoTokenizer.from_pretrained(path)


def image_text_processor(path: str) -> Step3VLProcessor | None:
    """The checkpoint's Step-3 processor when it ships one (its images are served), else None (text only)."""
    loaded = processor_or_tokenizer(path)
    return loaded if isinstance(loaded, Step3VLProcessor) else None


class Step3VLCheckpoint:
    """What the server builds for an official `Step3VLForConditionalGeneration` checkpoint: the image-text model
    when the checkpoint ships its processor, so that images are served, else the language model alone, which keeps
    continuous batching (transformers' server batches text-only models only)."""

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model_class = Step3VLForConditionalGeneration if image_text_processor(path) else Step3VLForCausalLM
        return model_class.from_pretrained(path, *args, **kwargs)


# Architecture name in a config.json -> what loads it.
STEP3_ARCHITECTURES = {
    "Step3ForCausalLM": Step3ForCausalLM,
    "Step3TextForCausalLM": Step3ForCausalLM,  # what `save_pretrained` and the official release write
    "Step3VLForCausalLM": Step3VLForCausalLM,
    "Step3VLForConditionalGeneration": Step3VLCheckpoint,  # the official multimodal checkpoint
}
# What of transformers' CLI the launcher uses: module -> name.
SERVER_HOOKS = {"transformers.cli.serve": "Serve", "transformers.cli.serving.server": "build_server"}


def supported_transformers() -> str:
    """The transformers range this package declares, e.g. `>=5.17,<5.26`, read from the installed metadata."""
    from packaging.requirements import Requirement

    try:
        for line in requires("step3-hf") or []:
            requirement = Requirement(line)
            if requirement.name == "transformers" and requirement.marker is None:
                return ",".join(sorted((str(spec) for spec in requirement.specifier), reverse=True))
    except PackageNotFoundError:
        pass
    return " as pyproject.toml declares"


def missing_server_hook() -> str | None:
    """The first hook of `SERVER_HOOKS` that this transformers lacks, as `module.name`, or None."""
    for module_name, attribute in SERVER_HOOKS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return f"{module_name}.{attribute}"
        if not hasattr(module, attribute):
            return f"{module_name}.{attribute}"
    return None


def expose_step3_to_server() -> None:
    """Make the Step-3 classes resolvable by the server's `getattr(transformers, architecture)`, and the image-text
    model known as one: the server tells an image-text model (`Modality.VLM`) by its architecture's name in
    `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES` (docs/compatibility.md)."""
    from transformers.models.auto import modeling_auto

    for name, model_class in STEP3_ARCHITECTURES.items():
        setattr(transformers, name, model_class)
        setattr(sys.modules["transformers"], name, model_class)  # another import may have replaced the entry
    modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("step3_vl", Step3VLForConditionalGeneration.__name__)


# A spawned model process imports this module (as its parent's main module) before it loads the model.
expose_step3_to_server()


@dataclass(frozen=True)
class ServedModel:
    """The checkpoint the server is pinned to, and the longest request it takes (`--max-model-len`, if given)."""

    path: str
    max_model_len: int | None = None

    def load_limits(self) -> ServedLimits:
        """What `request_validation.check_request` checks this checkpoint's requests against."""
        from transformers import AutoConfig, GenerationConfig

        loaded = processor_or_tokenizer(self.path)  # once: the processor and its tokenizer, or the tokenizer alone
        takes_images = isinstance(loaded, Step3VLProcessor)
        tokenizer = loaded.tokenizer if takes_images else loaded
        context = AutoConfig.from_pretrained(self.path).get_text_config().max_position_embeddings
        if self.max_model_len is not None:
            context = min(context, self.max_model_len)
        try:
            generation_max = GenerationConfig.from_pretrained(self.path).max_new_tokens
        except OSError:  # no generation_config.json
            generation_max = None
        # transformers serve generates at least 1024 tokens when a request sets no limit.
        default_token_limit = max(generation_max or 0, 1024)

        def count_tokens(prompt, body: dict) -> int:
            if isinstance(prompt, str):
                return len(tokenizer(prompt)["input_ids"])
            try:
                # With a processor, images expand to their crops' and global view's tokens, as the server's do.
                encoded = loaded.apply_chat_template(
                    prompt,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    tools=body.get("tools"),
                    **(body.get("chat_template_kwargs") or {}),
                )
            except Exception as err:  # the template's own complaint, e.g. about the tools or the roles
                raise RequestError(INVALID, "messages", f"The chat template cannot render this request: {err}")
            input_ids = encoded["input_ids"]
            return len(input_ids[0] if input_ids and isinstance(input_ids[0], list) else input_ids)

        return ServedLimits(count_tokens, context, default_token_limit, takes_images=takes_images)


def _validating_build_server(build_server, served: ServedModel):
    """transformers' `build_server`, whose app checks every generation request before handling it."""

    @functools.wraps(build_server)
    def build_validated_server(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_middleware(RequestValidationMiddleware, load=served.load_limits)
        return app

    return build_validated_server


def validate_requests_to(served: ServedModel) -> None:
    """Have the next app that transformers' server builds validate its requests against `served`."""
    from transformers.cli.serving import server

    build_server = getattr(server.build_server, "__wrapped__", server.build_server)
    server.build_server = _validating_build_server(build_server, served)


def _usage_error(message: str) -> None:
    print(f"step3-serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def continuous_batching_attention() -> str:
    """The attention Step-3 serves continuous batching with: `mfa_decode` where the decode kernel runs (a CUDA GPU
    with Triton; the model then batches on `mfa_paged`, see `step3_hf.kernels.transformers_paged_attention`), else
    SDPA (transformers' paged SDPA)."""
    return MFA_DECODE_ATTENTION if decode_kernel_preferred() else "sdpa"


def _with_step3_defaults(args: list[str]) -> list[str]:
    args = list(args)
    if not any(a in ("--continuous-batching", "--no-continuous-batching") for a in args):
        args.append("--continuous-batching")
    continuous = "--no-continuous-batching" not in args
    if continuous and not any(a == "--attn-implementation" or a.startswith("--attn-implementation=") for a in args):
        args += ["--attn-implementation", continuous_batching_attention()]
    return args


def _serve_command():
    """transformers' `Serve` command, pinned to a Step-3 checkpoint whose requests are validated.

    transformers 5.17 leaves the continuous-batching worker thread running after uvicorn shuts down on
    SIGINT/SIGTERM, which keeps the process alive; this subclass stops it, so the process exits.
    """
    from transformers.cli.serve import Serve

    class Step3Serve(Serve):
        @functools.wraps(Serve.__init__)
        def __init__(self, *args, **kwargs):
            force_model = kwargs.get("force_model", args[0] if args else None)
            if force_model is None:
                _usage_error("name the checkpoint to serve: step3-serve PATH [OPTIONS]")
            if kwargs.get("api_server_count", 1) not in (None, 1):
                _usage_error("--api-server-count must be 1 (requests are validated in that server)")
            validate_requests_to(ServedModel(force_model, kwargs.get("max_model_len")))
            try:
                super().__init__(*args, **kwargs)
            finally:
                if getattr(self, "_generation_state", None) is not None:
                    self._generation_state.shutdown()
                if getattr(self, "_model_manager", None) is not None:
                    self._model_manager.shutdown()

    Step3Serve.__doc__ = (
        "transformers serve for Step-3 checkpoints (continuous batching by default, on the MFA decode kernel on "
        "CUDA; malformed requests get HTTP 422 and requests longer than the model's context HTTP 400).\n\n"
        + (Serve.__doc__ or "")
    )
    return Step3Serve


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `step3-serve`: `transformers serve` with Step-3 visible, requests validated, Step-3 defaults."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise SystemExit("step3-serve: error: needs fastapi, uvicorn, pydantic and openai: pip install 'step3-hf[serve]'")
    missing = missing_server_hook()
    if missing is not None:
        raise SystemExit(
            f"step3-serve: error: transformers {transformers.__version__} has no {missing}; step3-serve supports "
            f"transformers {supported_transformers()}"
        )
    import typer

    app = typer.Typer(add_completion=False)
    serve_command = _serve_command()
    app.command(help=serve_command.__doc__)(serve_command)
    args = _with_step3_defaults(sys.argv[1:] if argv is None else list(argv))
    app(args, prog_name="step3-serve")


if __name__ == "__main__":
    main()
