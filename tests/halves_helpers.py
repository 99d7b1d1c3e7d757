# SPDX-License-Identifier: Apache-2.0
"""What the tests of the connector's two halves share: a request stand-in, a small geometry
and KV cache, and helpers that drive a scheduler half and a worker half together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kv_offload.config import OffloadConfig
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.vllm.metadata import JobOutcome, StepPlan, TransferReport
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf

BS = 128


@dataclass
class FakeRequest:
    request_id: str
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt + self.output


def make_half(slots: int = 16, world_size: int = 1, **cfg: object) -> SchedulerHalf:
    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0, **cfg})
    return SchedulerHalf(config, OffloadManager(slots, LRUPolicy(slots)), block_size=BS, world_size=world_size)


def ok_report(plan: StepPlan, success: bool = True) -> TransferReport:
    jobs = [(j, False) for j in plan.stores] + [(j, True) for j in plan.loads]
    return TransferReport([JobOutcome(j.job_id, success, 100 * len(j.slots), 0.001, load) for j, load in jobs])


def prefill(half: SchedulerHalf, req: FakeRequest, blocks: list[int]) -> StepPlan:
    half.on_alloc(req, blocks, 0)
    plan = half.build_plan([ScheduledRequest(req, req.num_computed_tokens, req.num_tokens, blocks)])
    req.num_computed_tokens = req.num_tokens
    return plan


GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_size=8, block_size=BS, dtype=torch.float32,
                  page_format=PageFormat.CPU)  # fmt: skip


def make_layers() -> list[torch.Tensor]:
    return [torch.randn(8, 2, BS, 16) for _ in range(2)]


def settle(worker: WorkerHalf, n: int) -> TransferReport:
    outcomes: list[JobOutcome] = []
    deadline = time.monotonic() + 10
    while len(outcomes) < n and time.monotonic() < deadline:
        worker.poll()
        report = worker.take_report()
        outcomes += report.outcomes if report else []
        time.sleep(0.001)
    assert len(outcomes) == n
    return TransferReport(outcomes)



def step(half: SchedulerHalf, worker: WorkerHalf, scheduled: list[ScheduledRequest]) -> StepPlan:
    plan = half.build_plan(scheduled)
    worker.flush(plan)
    worker.start_loads(plan)
    worker.submit_stores(plan)
    return plan


def run_until_settled(half: SchedulerHalf, worker: WorkerHalf) -> None:
    deadline = time.monotonic() + 20
    while (half.num_pending_jobs or worker.num_in_flight) and time.monotonic() < deadline:
        if not half._jobs:  # write-backs queued: the next step plans them
            step(half, worker, [])
        worker.poll()
        report = worker.take_report()
        if report:
            half.on_report(report)
        time.sleep(0.002)
    half.check_settled()
