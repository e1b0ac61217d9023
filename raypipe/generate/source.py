"""The stream's source: one execution's fixed plan, read as its read tasks.

:meth:`raypipe.generate.planner.Planner.plan_execution` cuts the rows an execution makes
into slices; read task ``t`` takes slice ``t`` (:meth:`~raypipe.generate.planner.Planner.take`)
and yields it as one block. A read task never waits, and one that Ray runs again gets the
same rows, so the source ends once the plan is read.
"""

from __future__ import annotations

from raypipe.generate.executions import CHUNK_SCHEMA


def plan_source(planner, execution: int, tasks: int):
    """A Ray Datasource of ``tasks`` read tasks over ``planner``'s plan of ``execution``."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read_fn(task: int):
        import ray

        rows = ray.get(planner.take.remote(execution, task))
        if rows.num_rows:
            yield rows

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, **kwargs):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [
                ReadTask(lambda t=t: read_fn(t), meta, schema=CHUNK_SCHEMA) for t in range(tasks)
            ]

        @property
        def supports_distributed_reads(self) -> bool:
            return True

    return PlanSource()
