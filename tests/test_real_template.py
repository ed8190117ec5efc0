"""The real Qwen2.5 chat template rendered by qmlx equals transformers' rendering (tools included)."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "서울 날씨 어때?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "多少度？"},
    ],
]  # fmt: skip

SCRIPT = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cases = json.loads(sys.stdin.read())
out = [tok.apply_chat_template(c["messages"], tools=c["tools"], tokenize=False, add_generation_prompt=True)
       for c in cases]
print(json.dumps(out))
"""


def test_template_matches_transformers(real_model, fixture_dir, fixture_venv_python):
    _, tok = real_model
    cases = [{"messages": m, "tools": t} for m in CONVERSATIONS for t in (None, TOOLS)]
    res = subprocess.run(
        [fixture_venv_python, "-c", SCRIPT, fixture_dir],
        input=json.dumps(cases), capture_output=True, text=True, check=True,
    )  # fmt: skip
    want = json.loads(res.stdout.strip().splitlines()[-1])
    for case, w in zip(cases, want):
        got = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tools=case["tools"])
        assert got == w
        assert tok.encode(got) == tok.encode(w)
