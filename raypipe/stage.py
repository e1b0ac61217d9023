"""The one small base of the generation stages, and the one place their actor pools are built.

A stage is a class that loads its model once in ``__init__`` and is a pure
``__call__(batch: pyarrow.Table) -> pyarrow.Table``. It declares the columns it reads
(``INPUT_COLUMNS``); the first batch it sees is checked against them, so a stage wired
after the wrong one fails at once with the missing column's name (as ``ray.data.llm``
stages do) instead of with a ``KeyError`` deep inside.

Every stage is appended with :func:`add_stage`, through Ray Data's public
``map_batches``. By default a stage takes each block as it arrives (``batch_size=None``);
the render pool asks for ``render.batch_size`` rows per call, which the stream can give
because each execution's input is a fixed plan that ends (raypipe.generate.source).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raypipe.errors import ConfigError


class Stage:
    """Base of the generation stages: declared input columns, checked on the first batch."""

    #: Columns the stage reads; the first batch must carry every one.
    INPUT_COLUMNS: tuple[str, ...] = ()
    #: Columns the stage fills (documentation, and what tests check).
    OUTPUT_COLUMNS: tuple[str, ...] = ()

    _columns_checked = False

    def check_columns(self, batch: pa.Table) -> None:
        """Raise once, on the first batch, if a declared input column is missing."""
        if self._columns_checked:
            return
        missing = [c for c in self.INPUT_COLUMNS if c not in batch.column_names]
        if missing:
            # Ray Data may wrap the class (e.g. _SingleThreadedWrapper): name the stage.
            name = next(c.__name__ for c in type(self).__mro__ if not c.__name__.startswith("_"))
            raise ConfigError(
                f"{name}: required input columns {missing} not found in its "
                f"batch (it has {batch.column_names}). The stage before it must produce them."
            )
        self._columns_checked = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check_columns(batch)
        return self.process(batch)

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


def add_stage(
    ds,
    stage: type,
    kwargs: dict[str, Any],
    *,
    batch_size: int | None = None,
    min_actors: int = 1,
    max_actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    **remote_args: Any,
):
    """Append ``stage`` to ``ds`` as an autoscaling actor pool (Ray Data restarts a dead
    actor and retries its block); ``batch_size`` rows per call, or whole blocks."""
    import ray

    return ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **remote_args,
    )
