"""Batch jobs: ``pst.batch.run(posterior, prompts, out, ...)`` and ``posterior batch PROMPTS --out OUT``.

One JSON line per prompt, per-prompt seeds derived from (seed, prompt index), resumable after a
kill (a resume with other settings or another posterior is refused), optionally data parallel
over Ray actors (``posterior.batch.ray_workers``). See ``posterior.batch.jobs`` for the seeds, the
line format and the resume rules.
"""

from posterior.batch.jobs import BatchReport, JobSpec, WriteError, prompt_seed, read_items, read_prompts, run, sample_line

__all__ = ["BatchReport", "JobSpec", "WriteError", "prompt_seed", "read_items", "read_prompts", "run", "sample_line"]
