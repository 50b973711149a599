"""The real bundled model answers a simple chat sensibly (slow: converts the GGUF once, ~1 min server start)."""

import openai
import pytest

from flywheel.clients.servers import start_server
from flywheel.server.models import resolve_model


@pytest.mark.slow
def test_smollm2_answers_a_simple_chat(tmp_path):
    with start_server(resolve_model("smollm2-135m-instruct"), tmp_path, served_model_name="smollm2") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2",
            temperature=0,
            max_tokens=40,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        )
        assert raw.headers["x-flywheel-policy-version"] == "0"
        text = raw.parse().choices[0].message.content
        assert "paris" in text.lower(), text
