"""Calling the platform from Python: both pipelines and the OpenAI-compatible route.

.venv/bin/python examples/client.py [http://127.0.0.1:8000]

The API key: `SERVEGRAPH_API_KEY`, else the admin key `make run` stored for you in
var/auth/local-admin.key.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import openai

LOCAL_KEY = Path(__file__).resolve().parent.parent / "var" / "auth" / "local-admin.key"


def api_key() -> str:
    return os.environ.get("SERVEGRAPH_API_KEY") or LOCAL_KEY.read_text().strip()


def main(base_url: str = "http://127.0.0.1:8000") -> None:
    headers = {"authorization": f"Bearer {api_key()}"}
    with httpx.Client(base_url=base_url, timeout=300, headers=headers) as client:
        rag = client.post(
            "/pipelines/rag", json={"question": "How long do refunds take after a return?"}
        )
        rag.raise_for_status()
        answer = rag.json()
        print("RAG answer:", answer["answer"])
        for passage in answer["cited"]:
            print(f"  [{passage['n']}] {passage['title']} (score {passage['score']:.2f})")

        # The same question streamed (SSE): the answer's text arrives as it is written.
        print("RAG streamed: ", end="", flush=True)
        with client.stream(
            "POST", "/pipelines/rag/stream", json={"question": "How do I reset my password?"}
        ) as stream:
            stream.raise_for_status()
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "chunk":
                    print(json.loads(line.removeprefix("data: "))["text"], end="", flush=True)
                elif line.startswith("data: ") and event == "result":
                    # The result holds the checked answer: the streamed text's supported
                    # sentences ("generated"), or the passages' own ("extractive").
                    result = json.loads(line.removeprefix("data: "))
                    print(f"\n  {result['method']} answer: {result['answer']}")
                    print(f"  cites {result['citations']}")
                elif line.startswith("data: ") and event == "error":
                    raise RuntimeError(line)

        triage = client.post(
            "/pipelines/triage",
            json={
                "text": "Where is my order 12345? It has not arrived.",
                "email": "ana@example.com",
            },
        )
        triage.raise_for_status()
        result = triage.json()
        print(f"Triage: team={result['team']} reply={result['reply']!r} ({result['drafted']})")
        for step in result["steps"]:
            print(f"  {step['tool']}({step['input']!r}) -> {step['output'][:80]!r}")

    llm = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key())  # sent as Bearer
    chat = llm.chat.completions.create(
        model="smollm2-135m-instruct",
        temperature=0,
        max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    print("LLM:", chat.choices[0].message.content)


if __name__ == "__main__":
    main(*sys.argv[1:])
