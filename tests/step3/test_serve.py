"""`step3-serve` (transformers' OpenAI-compatible server with continuous batching) on a tiny Step-3 checkpoint:
greedy text equal to `generate`, streaming, HTTP errors for bad requests while the server keeps serving, and a
clean shutdown. Every wait has a timeout and the server process is killed in a `finally`."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import step3_hf  # noqa: E402,F401
from step3_hf import Step3Config  # noqa: E402
from step3_hf.tiny_checkpoint import (  # noqa: E402
    TINY_CONFIG,
    random_official_state_dict,
    synthetic_corpus,
    write_official_checkpoint,
    write_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

STARTUP_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120  # bounds a hang; generous so a loaded 2-core machine does not fail a correct server
MESSAGES = [{"role": "user", "content": "the cat sees"}]
MAX_TOKENS = 12


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "step3-tiny"
    write_tiny_tokenizer(path, synthetic_corpus(2000))
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Larger weights than the default tiny checkpoint, so that greedy decoding is not one repeated token.
    config = Step3Config(**{**TINY_CONFIG, "vocab_size": len(tokenizer)})
    write_official_checkpoint(path, random_official_state_dict(config, std=0.3, seed=0), config)
    return path


@contextlib.contextmanager
def running_server(checkpoint, log_dir, *extra_args):
    """`step3-serve checkpoint` on a free loopback port, until it answers `/health`; killed on exit."""
    port = free_loopback_port()
    log_path = log_dir / "server.log"
    command = [sys.executable, "-m", "step3_hf.serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu", *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"step3-serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"step3-serve did not answer within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            try:
                if http(f"{base}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        yield {"base": base, "process": process, "log": log_path, "model": str(checkpoint)}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # A small paged cache: sized from free memory, it would take most of the machine's RAM on CPU.
    cache = ["--cb-num-blocks", "64", "--cb-max-batch-tokens", "512"]
    with running_server(checkpoint, tmp_path_factory.mktemp("serve-log"), *cache) as running:
        yield running


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def greedy_reference(checkpoint) -> str:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_console_script_is_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("step3-serve") == "step3_hf.serve:main"


def test_chat_completion_equals_greedy_generate_and_streams(server, checkpoint):
    expected = greedy_reference(checkpoint)
    assert len(expected.strip()) > 3 and len(set(expected)) > 3, expected  # a text worth comparing

    api = client(server)
    response = api.chat.completions.create(
        model=server["model"], messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens <= MAX_TOKENS

    stream = api.chat.completions.create(
        model=server["model"], messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1  # tokens arrive one by one, not as one block
    assert "".join(pieces) == expected


def test_bad_requests_get_http_errors_and_the_server_keeps_serving(server):
    api = client(server)
    url = f"{server['base']}/v1/chat/completions"

    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert "pinned" in error.value.response.text

    status, text = http(url, b'{"model": "x", "messages": [')  # malformed JSON
    assert status == 422, text

    status, text = http(url, json.dumps({"model": server["model"], "messages": MESSAGES, "bogus": 1}).encode())
    assert status == 422 and "bogus" in text

    context = TINY_CONFIG["max_position_embedding"]
    too_long = [{"role": "user", "content": "the cat sees a red box " * context}]
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model=server["model"], messages=too_long, max_tokens=4)
    assert f"context is {context} tokens" in error.value.response.text
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=context)
    assert "max_tokens" in error.value.response.text

    assert http(f"{server['base']}/health")[0] == 200
    again = api.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=4, temperature=0)
    assert again.choices[0].message.content


@pytest.mark.parametrize(
    "path, body, status, named",
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "lots"}, 422, "max_tokens"),
        ("/v1/chat/completions", {"messages": "the cat sees"}, 422, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 422, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -5}, 422, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 422, "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, 422, "top_p"),
        ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 422, "stream"),
        ("/v1/completions", {"prompt": 5}, 422, "prompt"),
        ("/v1/completions", {"prompt": "the cat sees " * 200, "max_tokens": 4}, 400, "context is"),
        ("/v1/responses", {"input": 5}, 422, "input"),
        ("/v1/responses", {"input": "the cat sees", "max_output_tokens": 0}, 422, "max_output_tokens"),
        ("/v1/responses", {"input": "the cat sees a red box " * 200}, 400, "context is"),
        ("/v1/responses", {"input": "the cat sees", "max_output_tokens": 600}, 400, "max_output_tokens"),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]}, 422,
         "input[0].content[0].text"),
    ],
)
def test_malformed_or_oversized_requests_get_4xx_naming_the_field(server, path, body, status, named):
    code, text = http(server["base"] + path, json.dumps({"model": server["model"], **body}).encode())
    assert code == status, text
    assert named in text, text
    assert http(f"{server['base']}/health")[0] == 200  # still serving


def test_every_endpoint_answers_a_request_that_fits(server):
    api = client(server)
    completion = api.completions.create(model=server["model"], prompt="the cat sees", max_tokens=4, temperature=0)
    assert completion.choices[0].text
    # `stream=False` spelled out: transformers 5.17 streams /v1/responses unless told otherwise.
    response = api.responses.create(
        model=server["model"], input="the cat sees", max_output_tokens=4, temperature=0, stream=False
    )
    assert response.output_text
    # No token limit: the server's default (1024) would run past the 512-token context; it stops at the context.
    chat = api.chat.completions.create(model=server["model"], messages=MESSAGES, temperature=0)
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= TINY_CONFIG["max_position_embedding"]


def test_clean_shutdown_on_sigterm(server):
    # Runs last in this module: it stops the module's server.
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)  # raises TimeoutExpired (and the fixture kills it) if a worker thread keeps it alive
    assert "Application shutdown complete" in server["log"].read_text()


# ------------------------------------------------------------------------------------------------- images


def png_data_url(width: int, height: int) -> str:
    from PIL import Image

    pixels = torch.arange(width * height * 3, dtype=torch.int64).reshape(height, width, 3) * 37 % 251
    buffer = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint

    path = tmp_path_factory.mktemp("serve-vl") / "step3-vl-tiny"
    return write_tiny_vl_checkpoint(path, synthetic_corpus(2000))


def test_images_as_data_urls_are_served_as_generate_sees_them_and_never_fetched(vl_checkpoint, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    url = png_data_url(200, 60)  # wide: the global view and crops
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "the cat sees"}]
    processor = AutoProcessor.from_pretrained(vl_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(vl_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, content[1]]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    assert int(inputs["num_patches"][0]) > 0  # the request exercises the crops
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    expected = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    with torch.no_grad():  # the image matters: without it the model says something else
        text_only = processor.apply_chat_template([{"role": "user", "content": [content[1]]}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
        assert not torch.equal(model(**inputs).logits[0, -1], model(**text_only).logits[0, -1])

    with running_server(vl_checkpoint, tmp_path_factory.mktemp("serve-vl-log")) as running:
        api = client(running)
        response = api.chat.completions.create(
            model=running["model"],
            messages=[{"role": "user", "content": content}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert response.choices[0].message.content == expected
        assert response.usage.prompt_tokens == inputs["input_ids"].shape[1]

        for bad_url, says in [("http://127.0.0.1:9/cat.png", "never fetches"), ("data:image/png;base64,AAAA", "image")]:
            body = {"model": running["model"], "max_tokens": 2,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad_url}}]}]}  # fmt: skip
            status, text = http(f"{running['base']}/v1/chat/completions", json.dumps(body).encode())
            error = json.loads(text)["error"]
            assert status == 422 and error["param"] == "messages[0].content[0].image_url.url", text
            assert says in error["message"]
        assert http(f"{running['base']}/health")[0] == 200
