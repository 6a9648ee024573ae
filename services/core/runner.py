"""Runs one merged batch of jobs through a scorer and splits the result back per job.

Jobs from different requests (and clients) share a model call. Their group ids are namespaced by job
so two clients' "g0" never mix. If the merged call fails, each job is retried alone so that one bad
sample fails only its own request, not the other clients' work that happened to share its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from services.core.scorer import ScoreBatch, Scorer, check_output

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class JobResult:
    """Scores of one job: output name → (n,) float64 array, and group id → outputs."""

    samples: dict[str, np.ndarray]
    groups: dict[str, dict[str, float]]


def run_jobs(scorer: Scorer, jobs: list[ScoreBatch]) -> list[JobResult | Exception]:
    """Score ``jobs`` in one model call; per job, a result or the exception that job raised."""
    try:
        return list(_run_merged(scorer, jobs))
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
        log.warning("merged batch of %d jobs failed (%s); isolating jobs", len(jobs), exc)
    results: list[JobResult | Exception] = []
    for job in jobs:
        try:
            results.extend(_run_merged(scorer, [job]))
        except Exception as exc:
            results.append(exc)
    return results


def _run_merged(scorer: Scorer, jobs: list[ScoreBatch]) -> list[JobResult]:
    images, prompts, metadata, group_ids = [], [], [], []
    for index, job in enumerate(jobs):
        images.extend(job.images)
        prompts.extend(job.prompts)
        metadata.extend(job.metadata)
        group_ids.extend(f"{index}:{gid}" if gid else "" for gid in job.group_ids)
    merged = ScoreBatch(images=images, prompts=prompts, metadata=metadata, group_ids=group_ids)
    output = scorer.score(merged)
    check_output(scorer.identity, merged, output)
    arrays = {name: values.detach().double().cpu().numpy() for name, values in output.samples.items()}
    results = []
    start = 0
    for index, job in enumerate(jobs):
        stop = start + len(job)
        prefix = f"{index}:"
        groups = {
            gid[len(prefix) :]: values for gid, values in output.groups.items() if gid.startswith(prefix)
        }
        results.append(JobResult(samples={k: v[start:stop] for k, v in arrays.items()}, groups=groups))
        start = stop
    return results
