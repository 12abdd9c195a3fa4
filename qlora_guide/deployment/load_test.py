"""A server under load: chat requests from several concurrent clients, and what they measured.

:func:`measure_clients` sends greedy chat requests to a running server from
``clients`` threads, each a client that waits for its answer before it asks
again (the way chat users and most batch jobs behave), and reports the
completion tokens per second over the wall time, the requests per second and
the latency percentiles. :func:`measure_load` does it for each number of
clients in turn; :func:`ask_at_once` sends a set of requests together, for
a server's batching to see. The benchmark (``benchmarks/bench_deployment.py``) and the
deployment page call them.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

QUESTIONS = [
    "Explain what QLoRA is and why it saves memory.",
    "What does the rank r of a LoRA adapter control?",
    "Why are the frozen weights stored in NF4?",
    "Qu'est-ce que la double quantification ?",
    "How does gradient checkpointing trade compute for memory?",
    "What is a paged optimizer for?",
    "Pourquoi fusionner un adaptateur dans le modèle ?",
    "What is the compute dtype of a 4-bit layer?",
]


def chat_request(url: str, model: str, question: str, max_tokens: int, api_key: str | None = None) -> dict[str, Any]:
    """Send one greedy chat request to the server at ``url`` (its ``/v1`` base); its JSON reply (an HTTP error raises)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def ask_at_once(url: str, requests: list[tuple[str, str]], max_tokens: int = 64, api_key: str | None = None) -> list[dict[str, Any]]:
    """Send every ``(model, question)`` greedy chat request at the same time; their JSON replies, in order."""
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(lambda job: chat_request(url, job[0], job[1], max_tokens, api_key), requests))


def ask(url: str, model: str, question: str, max_tokens: int, api_key: str | None = None) -> tuple[float, int]:
    """One greedy chat request: its latency in seconds and its completion tokens."""
    start = time.perf_counter()
    reply = chat_request(url, model, question, max_tokens, api_key)
    return time.perf_counter() - start, reply["usage"]["completion_tokens"]


def percentile(values: list[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure_clients(url: str, model: str, clients: int, total: int, max_tokens: int = 24,
                    questions: list[str] | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Send ``total`` requests from ``clients`` concurrent clients; figures."""
    questions = questions or QUESTIONS
    work = [questions[i % len(questions)] for i in range(total)]
    lock = threading.Lock()
    results: list[tuple[float, int]] = []

    def client(index: int) -> None:
        for question in work[index::clients]:
            result = ask(url, model, question, max_tokens, api_key)
            with lock:
                results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
    }


def measure_load(server: Any, clients: list[int], requests_per_count: int, max_tokens: int = 24) -> list[dict[str, Any]]:
    """:func:`measure_clients` for each number of clients against a started server, after one untimed warm-up request."""
    model = server.app.served_ids[0]
    ask(server.url, model, QUESTIONS[0], max_tokens)
    return [{"max_batch": server.app.limits.max_batch, **measure_clients(server.url, model, n, max(requests_per_count, n), max_tokens)}
            for n in clients]
