# SPDX-License-Identifier: Apache-2.0
"""The soak's clients: a mixed, open-ended workload, and the check against vLLM alone.

Each client loops until told to stop, drawing its next request from a mix (deterministic for
a seed and a client number):

* ``shared``: one of a few long documents every client shares, plus a new question;
* ``doc``: one of the client's own documents, plus a new question;
* ``unique``: a prompt never seen again;
* ``overflow``: a unique prompt longer than the DRAM pool (the pool keeps its leading blocks);

sent as a streamed completion, a plain (non-streamed) one, or a stream the client closes
after a few tokens (an abort mid-stream); the number of tokens to generate varies from 1 to
``max_tokens``. Every prompt sent is remembered (deduplicated); :func:`reference_run` asks a
vLLM-alone server for each one afterwards, and :func:`check` compares: a completion must be
the reference's first ``max_tokens`` tokens, an aborted stream a prefix of them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from serving_workload import VOCAB_HI, Request, Result, stream_completion

__all__ = ["Clients", "Prompts", "Sent", "SoakSpec", "check", "plain_completion", "reference_run"]


@dataclass(frozen=True)
class SoakSpec:
    clients: int = 12
    shared_docs: int = 3
    shared_doc_tokens: tuple[int, int] = (768, 1536)
    docs_per_client: int = 2
    doc_tokens: tuple[int, int] = (384, 1152)
    question_tokens: tuple[int, int] = (8, 48)
    unique_tokens: tuple[int, int] = (128, 1024)
    #: longer than the DRAM pool the soak configures (24 blocks of 128 tokens)
    overflow_tokens: tuple[int, int] = (3200, 3600)
    #: weights of shared / doc / unique / overflow
    kinds: tuple[float, float, float, float] = (0.35, 0.35, 0.25, 0.05)
    #: weights of streamed / plain / aborted
    modes: tuple[float, float, float] = (0.6, 0.25, 0.15)
    max_tokens: int = 64
    seed: int = 0

    def max_prompt_tokens(self) -> int:
        docs = max(self.shared_doc_tokens[1], self.doc_tokens[1]) + self.question_tokens[1]
        return max(docs, self.unique_tokens[1], self.overflow_tokens[1])


@dataclass
class Sent:
    """One request a client sent, and what came back."""

    result: Result
    mode: str  # "stream", "plain" or "abort"
    digest: str  # the prompt's (see :class:`Prompts`)
    phase: str
    ended: float  # seconds since the clients' start


class Prompts:
    """Every prompt sent, once each, by digest; and the most tokens any request asked of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[str, bytes] = {}
        self.max_tokens: dict[str, int] = {}

    def add(self, prompt: list[int], max_tokens: int) -> str:
        raw = np.asarray(prompt, dtype=np.int32).tobytes()
        digest = hashlib.blake2b(raw, digest_size=12).hexdigest()
        with self.lock:
            self.tokens.setdefault(digest, raw)
            self.max_tokens[digest] = max(self.max_tokens.get(digest, 0), max_tokens)
        return digest

    def prompt(self, digest: str) -> list[int]:
        return np.frombuffer(self.tokens[digest], dtype=np.int32).tolist()


def plain_completion(port: int, model: str, req: Request, t0: float, timeout: float = 900.0, *,
                     extra: dict[str, Any] | None = None) -> Result:  # fmt: skip
    """A non-streamed completion (its tokens by id, and the cached prompt tokens)."""
    res = Result(req.rid, req.user, req.kind, req.first_visit, len(req.prompt), req.max_tokens)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **(extra or {})}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        start = time.perf_counter()
        res.sent = start - t0
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        res.latency = time.perf_counter() - start
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {data[:300]!r}"
            return res
        doc = json.loads(data)
        res.token_ids = list(doc["choices"][0].get("token_ids") or [])
        details = (doc.get("usage") or {}).get("prompt_tokens_details") or {}
        res.cached_tokens = details.get("cached_tokens")
        if not res.token_ids:
            res.error = "no token returned"
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return res


class Clients:
    """``spec.clients`` threads sending the mix to ``127.0.0.1:port`` until :meth:`stop`."""

    def __init__(self, spec: SoakSpec, port: int, model: str, prompts: Prompts, phase: str, seed_offset: int = 0,
                 timeout: float = 120.0) -> None:  # fmt: skip
        self.spec, self.port, self.model, self.prompts, self.phase = spec, port, model, prompts, phase
        #: seconds a request may go without a byte from the server (a stalled engine fails it)
        self.timeout = timeout
        self.sent: list[Sent] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.t0 = time.perf_counter()
        shared_rng = random.Random(spec.seed)
        self.shared = [self._tokens(shared_rng, shared_rng.randint(*spec.shared_doc_tokens)) for _ in range(spec.shared_docs)]
        self.threads = [
            threading.Thread(target=self._run, args=(c, random.Random(spec.seed * 7919 + c * 104729 + seed_offset)), daemon=True)
            for c in range(spec.clients)
        ]  # fmt: skip
        self.on_result: Callable[[Sent], None] | None = None

    @staticmethod
    def _tokens(rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(3, VOCAB_HI) for _ in range(n)]

    def start(self) -> Clients:
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> list[Sent]:
        self.stopping.set()
        for t in self.threads:
            t.join()
        return self.sent

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _run(self, client: int, rng: random.Random) -> None:
        spec = self.spec
        # The client's documents come from a generator of their own: the same in every phase.
        doc_rng = random.Random(spec.seed * 31 + client)
        docs = [self._tokens(doc_rng, doc_rng.randint(*spec.doc_tokens)) for _ in range(spec.docs_per_client)]
        n = 0
        while not self.stopping.is_set():
            kind = rng.choices(("shared", "doc", "unique", "overflow"), weights=spec.kinds)[0]
            question = self._tokens(rng, rng.randint(*spec.question_tokens))
            if kind == "shared":
                prompt = rng.choice(self.shared) + question
            elif kind == "doc":
                prompt = rng.choice(docs) + question
            elif kind == "unique":
                prompt = self._tokens(rng, rng.randint(*spec.unique_tokens))
            else:
                prompt = self._tokens(rng, rng.randint(*spec.overflow_tokens))
            mode = rng.choices(("stream", "plain", "abort"), weights=spec.modes)[0]
            r = rng.random()
            max_tokens = 1 if r < 0.1 else rng.randint(2, 16) if r < 0.6 else rng.randint(17, spec.max_tokens)
            abort_after = None
            if mode == "abort":
                max_tokens = max(max_tokens, 16)
                abort_after = rng.randint(1, 4)
            digest = self.prompts.add(prompt, max_tokens)
            req = Request(f"{self.phase}-c{client}r{n}", client, n, kind, None, prompt, max_tokens, 0.0)
            n += 1
            if mode == "plain":
                res = plain_completion(self.port, self.model, req, self.t0, timeout=self.timeout)
            else:
                res = stream_completion(self.port, self.model, req, self.t0, timeout=self.timeout, abort_after=abort_after)
            sent = Sent(res, mode, digest, self.phase, self.now())
            with self.lock:
                self.sent.append(sent)
            if self.on_result is not None:
                self.on_result(sent)
            if res.error is not None:
                time.sleep(0.5)  # a server that is down: do not spin


def reference_run(port: int, model: str, prompts: Prompts, workers: int = 8) -> dict[str, list[int]]:
    """Each prompt's greedy tokens (its largest ``max_tokens``) from a server without kv-offload."""
    digests = sorted(prompts.tokens)

    def one(d: str) -> tuple[str, list[int]]:
        req = Request(d, 0, 0, "ref", None, prompts.prompt(d), prompts.max_tokens[d], 0.0)
        for _ in range(3):
            res = plain_completion(port, model, req, 0.0, timeout=900)
            if res.error is None:
                return d, res.token_ids
        raise RuntimeError(f"the reference server failed a request: {res.error}")

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, digests))


def check(sent: list[Sent], reference: dict[str, list[int]]) -> dict[str, Any]:
    """Completions against vLLM alone: full ones equal, aborted ones a prefix."""
    checked = mismatched = 0
    samples: list[dict[str, Any]] = []
    for s in sent:
        r = s.result
        if r.error is not None:
            continue
        ref = reference[s.digest][: r.max_tokens]
        ok = r.token_ids == ref[: len(r.token_ids)] if r.aborted else r.token_ids == ref
        checked += 1
        if not ok:
            mismatched += 1
            if len(samples) < 5:
                first = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), min(len(r.token_ids), len(ref)))
                samples.append({"rid": r.rid, "mode": s.mode, "kind": r.kind, "prompt_tokens": r.prompt_tokens,
                                "max_tokens": r.max_tokens, "got": len(r.token_ids), "first_difference": first})  # fmt: skip
    return {"checked": checked, "mismatches": mismatched, "mismatch_samples": samples}
