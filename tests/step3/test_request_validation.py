"""`step3-serve`'s door: request bodies checked field by field, and against the model's context, without a server
(`tests/step3/test_serve.py` sends the same kinds of request to a running one). Also: a transformers without the
server hooks the launcher needs gets one line naming the supported range."""

import base64
import dataclasses
import io
import struct
import subprocess
import sys
import zlib

import pytest
from step3_hf import Step3Config
from step3_hf.request_validation import INVALID, TOO_LONG, RequestError, check_fields, check_request
from step3_hf.serve import ServedModel, supported_transformers
from step3_hf.tiny_checkpoint import (
    TINY_CONFIG,
    random_official_state_dict,
    synthetic_corpus,
    write_official_checkpoint,
    write_tiny_tokenizer,
)
from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint
from transformers import AutoProcessor, AutoTokenizer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "the cat sees"}]


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    path = tmp_path_factory.mktemp("door") / "step3-tiny"
    write_tiny_tokenizer(path, synthetic_corpus(500))
    config = Step3Config(**{**TINY_CONFIG, "vocab_size": len(AutoTokenizer.from_pretrained(path))})
    write_official_checkpoint(path, random_official_state_dict(config, seed=0), config)
    return path, ServedModel(str(path)).load_limits()


def refused(limits, path, body) -> RequestError:
    with pytest.raises(RequestError) as error:
        check_request(path, body, limits[1])
    return error.value


def test_prompt_is_counted_as_the_chat_template_renders_it(limits):
    path, served = limits
    count_tokens, context, default_limit = served.count_tokens, served.context_length, served.default_token_limit
    assert served.takes_images is False  # a tokenizer, no image processor
    tokenizer = AutoTokenizer.from_pretrained(path)
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert count_tokens(MESSAGES, {}) == len(rendered["input_ids"]) > 3
    assert count_tokens("the cat sees", {}) == len(tokenizer("the cat sees")["input_ids"])
    assert context == TINY_CONFIG["max_position_embedding"] and default_limit == 1024


@pytest.mark.parametrize(
    "path, body, field",
    [
        (CHAT, {"messages": MESSAGES, "max_tokens": "lots"}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": True}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 2.5}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
        (CHAT, {"messages": "the cat sees"}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
         "messages[0].content[0].text"),
        (CHAT, {"messages": [{"role": "user", "content": [7]}]}, "messages[0].content[0]"),
        (CHAT, {"messages": [MESSAGES[0], "hi"]}, "messages[1]"),
        (CHAT, {"messages": MESSAGES, "temperature": -1}, "temperature"),
        (CHAT, {"messages": MESSAGES, "temperature": 2.5}, "temperature"),
        (CHAT, {"messages": MESSAGES, "top_p": 0}, "top_p"),
        (CHAT, {"messages": MESSAGES, "frequency_penalty": "high"}, "frequency_penalty"),
        (CHAT, {"messages": MESSAGES, "seed": 1.5}, "seed"),
        (CHAT, {"messages": MESSAGES, "stop": [1]}, "stop"),
        (CHAT, {"messages": MESSAGES, "model": 3}, "model"),
        (CHAT, ["not", "an", "object"], None),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -5}, "max_tokens"),
        ("/v1/responses", {"input": 5}, "input"),
        ("/v1/responses", {"input": []}, "input"),
        ("/v1/responses", {"input": "hi", "instructions": 4}, "instructions"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": "600"}, "max_output_tokens"),
    ],
)
def test_malformed_fields_are_refused_by_name(limits, path, body, field):
    error = refused(limits, path, body)
    assert error.status == INVALID and error.field == field
    if field is not None:
        assert f"`{field}`" in error.message


def test_requests_beyond_the_context_are_refused_on_every_endpoint(limits):
    context = TINY_CONFIG["max_position_embedding"]
    long_text = "the cat sees a red box " * context
    for path, body, field in [
        (CHAT, {"messages": [{"role": "user", "content": long_text}]}, "messages"),
        ("/v1/completions", {"prompt": long_text}, "prompt"),
        ("/v1/responses", {"input": long_text}, "input"),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": long_text}]}]}, "input"),
        ("/v1/responses", {"input": "hi", "instructions": long_text}, "input"),
    ]:
        error = refused(limits, path, body)
        assert error.status == TOO_LONG and error.field == field and f"context is {context} tokens" in error.message
    for path, field in [(CHAT, "max_tokens"), (CHAT, "max_completion_tokens"), ("/v1/responses", "max_output_tokens")]:
        prompt = {"messages": MESSAGES} if path == CHAT else {"input": "the cat sees"}
        error = refused(limits, path, {**prompt, field: context})
        assert error.status == TOO_LONG and error.field == field and f"context of {context} tokens" in error.message


def test_a_request_that_fits_passes_and_a_missing_limit_is_capped_at_the_context(limits):
    served = limits[1]
    context = served.context_length
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True, "stop": ["."]}
    assert check_request(CHAT, body, served) is body  # forwarded unchanged
    prompt_tokens = served.count_tokens(MESSAGES, {})
    capped = check_request(CHAT, {"messages": MESSAGES}, served)
    assert capped == {"messages": MESSAGES, "max_tokens": context - prompt_tokens}
    # A default that fits the context is left to the server.
    roomy = dataclasses.replace(served, context_length=100_000)
    assert "max_tokens" not in check_request(CHAT, {"messages": MESSAGES}, roomy)
    capped = check_request("/v1/responses", {"input": "hi"}, served)
    assert 0 < capped["max_output_tokens"] < context


def test_supported_range_is_read_from_the_installed_metadata():
    assert supported_transformers().startswith(">=5.")


def test_missing_server_hook_exits_with_one_line_naming_the_supported_range():
    code = (
        "import transformers.cli.serving.server as server; del server.build_server; "
        "from step3_hf.serve import main; main(['some/checkpoint'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # SystemExit with a message
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "build_server" in lines[0] and f"transformers {supported_transformers()}" in lines[0]


# ------------------------------------------------------------------------------------------------- images


def png_data_url(width: int = 40, height: int = 30, color=(200, 30, 60)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def png_claiming_size(width: int, height: int) -> str:
    """A 1x1 PNG whose header (CRC fixed) claims `width x height`: a decompression bomb's first bytes."""
    raw = bytearray(base64.b64decode(png_data_url(1, 1).split(",", 1)[1]))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr : ihdr + 17])))
    return "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()


def image_message(url, text: str = "the cat sees") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vl_limits(tmp_path_factory):
    path = tmp_path_factory.mktemp("door-vl") / "step3-vl-tiny"
    write_tiny_vl_checkpoint(path, synthetic_corpus(500))
    return path, ServedModel(str(path)).load_limits()


def test_an_image_is_counted_as_the_processor_expands_it(vl_limits):
    path, served = vl_limits
    assert served.takes_images is True
    processor = AutoProcessor.from_pretrained(path)
    text_only = served.count_tokens([{"role": "user", "content": "the cat sees"}], {})
    for width, height in [(40, 30), (400, 90)]:  # a global view alone; a wide image with crops
        _, messages = check_fields(CHAT, {"messages": image_message(png_data_url(width, height))}, images=True)
        image = messages[0]["content"][0]["image"]
        assert image.size == (width, height) and image.mode == "RGB"
        assert served.count_tokens(messages, {}) == text_only + processor.num_image_tokens(width, height)
    assert processor.num_image_tokens(400, 90) > processor.num_image_tokens(40, 30)
    body = {"messages": image_message(png_data_url()), "max_tokens": 4}
    assert check_request(CHAT, body, served) is body
    responses = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": png_data_url()}]}]}
    assert check_request("/v1/responses", responses, served) is responses


@pytest.mark.parametrize(
    "url, says",
    [
        ("https://example.com/cat.png", "never fetches"),
        ("http://127.0.0.1:1/cat.png", "never fetches"),
        ("/etc/passwd", "never fetches"),
        ("file:///etc/passwd", "never fetches"),
        ("data:text/plain;base64,aGk=", "never fetches"),
        ("data:image/png;base64,***", "invalid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not a readable image"),
        (png_claiming_size(10_000, 10_000), "decompression bomb"),  # past PIL's 89.5M-pixel guard
        (7, "must be a data URL string"),
    ],
)
def test_image_urls_other_than_readable_data_urls_are_refused_by_name(vl_limits, url, says):
    error = refused(vl_limits, CHAT, {"messages": image_message(url)})
    assert error.status == INVALID and error.field == "messages[0].content[0].image_url.url"
    assert says in error.message


def test_a_text_model_refuses_image_parts_by_name(limits):
    error = refused(limits, CHAT, {"messages": image_message(png_data_url())})
    assert error.status == INVALID and error.field == "messages[0].content[0].type"
    assert "no image processor" in error.message
