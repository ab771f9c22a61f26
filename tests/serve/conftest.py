"""A real server on a free loopback port (uvicorn in a thread) over a tiny random byte-level Llama."""

import contextlib
import socket
import threading
import time

import pytest
import torch

from tests.model.conftest import make_hf_model

MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory):
    """A tiny Llama over the 259-token ByteTokenizer, saved with its tokenizer (chat template included)."""
    from longreach.model.tokenizer import BOS_TOKEN_ID, BYTE_VOCAB_SIZE, EOS_TOKEN_ID, ByteTokenizer

    model = make_hf_model(
        "llama",
        vocab_size=BYTE_VOCAB_SIZE,
        max_position_embeddings=2048,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    path = tmp_path_factory.mktemp("byte-llama")
    model.save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return path


def make_engine(path, max_model_len=MAX_MODEL_LEN, **kwargs):
    from longreach import LLM

    kwargs = {"block_size": 8, "num_kv_blocks": 256, **kwargs}
    return LLM(path, dtype="fp32", device="cpu", max_model_len=max_model_len, **kwargs).engine


class RunningServer:
    def __init__(self, app, server, thread, port):
        self.app, self.server, self.thread, self.port = app, server, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.engine = app.state.server.engine

    def client(self, api_key="unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def metric(self, name, labels=""):
        """The value of one sample of /metrics (e.g. 'longreach_kv_cache_blocks_used')."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        raise KeyError(f"{name}{labels} not in /metrics")

    def wait_idle(self, timeout=20.0):
        """Until no request runs or waits and every KV block is free (as /metrics reports)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.metric("longreach_kv_cache_blocks_used") == 0
                and self.metric("longreach_num_requests_running") == 0
                and self.metric("longreach_num_requests_waiting") == 0
            ):
                return
            time.sleep(0.05)
        raise AssertionError("the server did not become idle")


@contextlib.contextmanager
def run_server(engine, model_name="tiny", **app_kwargs):
    import uvicorn

    from longreach.serve.server import Server, create_app

    app = create_app(engine, model_name, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = Server(config, shutdown_timeout=2.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield RunningServer(app, server, thread, port)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(byte_model_dir, one_thread):
    with run_server(make_engine(byte_model_dir)) as running:
        yield running
