"""Devices and processes, the lowest floor: the mesh, placement, gathers, process slices, barriers.

Shape convention: arrays placed here are split along their first axis (batch ``B`` or database
rows ``N``) over the mesh's single axis ``"data"``; everything else is replicated.

``make_mesh()`` builds the 1-D mesh over every device of every process (``jax.devices()``);
callers build it once (``experiment.run``) and pass it down as ``mesh=``. ``initialize(
multihost=True)`` calls ``jax.distributed.initialize()`` (TPU VM pods and SLURM/Kubernetes GPU
clusters are detected automatically); with ``multihost=False`` it does nothing. Retrieval
(``search``, ``expansion``, ``diffusion``) and extraction both import this module and nothing
above it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

__all__ = [
    "DATA_AXIS",
    "Sharded",
    "axis_name",
    "allgather_json",
    "allgather_rows",
    "initialize",
    "is_main_process",
    "local_mesh",
    "make_mesh",
    "mesh_size",
    "process_slice",
    "replicate",
    "ring_perm",
    "shard_batch",
    "shard_map",
    "shard_rows",
    "shard_batch",
    "sync",
    "to_host",
]

DATA_AXIS = "data"
#: rows per all-gather round when collecting rows from all processes.
GATHER_ROWS = 1 << 16


# ----------------------------------------------------------------------------- mesh, processes


def initialize(
    multihost: bool = False,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> None:
    """Starts JAX's multi-process runtime when ``multihost`` (``config.distributed.multihost``).

    Must run before any other JAX call touches a device. Idempotent; a no-op unless
    ``multihost``. ``cpu_collectives`` selects the CPU cross-process collectives (``"gloo"``;
    ``None`` keeps JAX's default) so CPU-only clusters and tests can all-gather.
    """
    if not multihost:
        return
    if jax.distributed.is_initialized():
        return
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(devices: Sequence[jax.Device] | None = None, *, axis_name: str = DATA_AXIS) -> Mesh:
    """The 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: got an empty device list")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def local_mesh(mesh: Mesh | None = None) -> Mesh:
    """The mesh of this process's devices of ``mesh`` (default: all local devices)."""
    if mesh is None:
        return make_mesh(jax.local_devices())
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return make_mesh(mine, axis_name=mesh.axis_names[0])


def mesh_size(mesh: Mesh | None) -> int:
    """Number of devices of ``mesh`` (1 for ``None``)."""
    return 1 if mesh is None else int(mesh.devices.size)


def process_slice(
    n: int, *, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The contiguous rows ``[lo, hi)`` of ``n`` items process ``p`` of ``P`` handles.

    Blocks of ``ceil(n / P)``; the last processes may get fewer (or none).
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= p < count:
        raise ValueError(f"process_index={p} out of range for process_count={count}")
    per = -(-n // count) if n else 0
    return slice(min(n, p * per), min(n, (p + 1) * per))


def is_local(mesh: Mesh) -> bool:
    return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def axis_name(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names} {mesh.devices.shape}")
    return mesh.axis_names[0]


def shard_batch(x: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """Places ``x`` ``[B, ...]`` with its first axis split over the mesh.

    ``B`` must be a multiple of the number of devices the mesh has in this process; with several
    processes ``x`` holds this process's rows and the global batch is their concatenation.
    """
    sharding = NamedSharding(mesh, P(axis_name(mesh)))
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if x.shape[0] % max(local, 1):
        raise ValueError(
            f"batch of shape {tuple(x.shape)}: size {x.shape[0]} is not a multiple of the "
            f"{local} local devices of the mesh; pad it (extract.padded_batch_size)"
        )
    if is_local(mesh):
        return jax.device_put(x, sharding)
    return multihost_utils.host_local_array_to_global_array(x, mesh, P(axis_name(mesh)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` replicated on every device of ``mesh``."""
    if not is_local(mesh):
        return multihost_utils.host_local_array_to_global_array(
            jax.tree.map(np.asarray, tree), mesh, P()
        )
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda leaf: jax.device_put(leaf, sharding), tree)


def sync(name: str) -> None:
    """A barrier across processes (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """Whether this process writes shared outputs (process 0)."""
    return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one NumPy array on this host."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_rows(rows: np.ndarray, *, block: int = GATHER_ROWS) -> np.ndarray:
    """Concatenates every process's ``[n_p, ...]`` rows in process order -> ``[sum n_p, ...]``.

    Collective: every process calls it. Rows travel in rounds of ``block`` rows per process.
    """
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(rows)], np.int32)))
    sizes = sizes.reshape(-1)
    longest = int(sizes.max())
    if longest == 0:
        return rows[:0]
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for start in range(0, longest, block):
        stop = min(start + block, longest)
        chunk = np.zeros((stop - start, *rows.shape[1:]), rows.dtype)
        mine = rows[start:stop]
        chunk[: len(mine)] = mine
        got = np.asarray(multihost_utils.process_allgather(chunk))
        for p, size in enumerate(sizes):
            parts[p].append(got[p, : max(0, min(stop, size) - start)])
    return np.concatenate([np.concatenate(p) for p in parts], axis=0)


def allgather_json(obj: Any) -> list[Any]:
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    joined = allgather_rows(data)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32)))
    out, start = [], 0
    for size in sizes.reshape(-1):
        out.append(json.loads(joined[start : start + size].tobytes().decode()))
        start += size
    return out


# ----------------------------------------------------------------------------- rows over a mesh


class Sharded(NamedTuple):
    """Rows split over a 1-D mesh: ``array`` ``[n_dev * s, ...]`` (padding last), ``n`` valid."""

    array: jax.Array
    n: int

    def unpad(self) -> jax.Array:
        """The ``[n, ...]`` valid rows (resharded by XLA; may gather)."""
        return self.array[: self.n]

    def to_numpy(self) -> np.ndarray:
        """The ``[n, ...]`` valid rows on this host (all processes' rows)."""
        return to_host(self.array)[: self.n]


def shard_rows(x: ArrayLike | Sharded, mesh: Mesh) -> Sharded:
    """``x`` ``[N, ...]`` padded to a multiple of the mesh size and split by rows over it.

    With several processes ``x`` must be the full array on every process (each keeps only the
    rows of its devices).
    """
    if isinstance(x, Sharded):
        want = NamedSharding(mesh, P(axis_name(mesh)))
        if x.array.sharding.is_equivalent_to(want, x.array.ndim):
            return x
        x = x.unpad()
    size = mesh.devices.size
    n = int(np.shape(x)[0])
    rows = -(-max(n, 1) // size) * size
    sharding = NamedSharding(mesh, P(axis_name(mesh)))
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        padded = jnp.pad(x, ((0, rows - n),) + ((0, 0),) * (x.ndim - 1))
        return Sharded(jax.device_put(padded, sharding), n)
    host = np.asarray(x)
    if rows == n and jax.process_count() == 1:  # nothing to pad: one transfer, no copy here
        return Sharded(jax.device_put(host, sharding), n)
    shape = (rows, *host.shape[1:])

    def block(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi, _ = index[0].indices(rows)
        out = np.zeros((hi - lo, *host.shape[1:]), host.dtype)
        out[: max(0, min(hi, n) - lo)] = host[lo:hi]
        return out

    return Sharded(jax.make_array_from_callback(shape, sharding, block), n)


def shard_map(mesh: Mesh, fn, in_specs, out_specs):
    """``jax.shard_map`` over ``mesh`` with the varying-axes check off (see the comment)."""
    # check_vma=False: the merged top-k after an all_gather is replicated, which the varying-
    # manual-axes check cannot infer (all_gather outputs count as device-varying).
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def ring_perm(size: int) -> list[tuple[int, int]]:
    """``lax.ppermute`` pairs that pass each shard to the previous device around the ring."""
    return [(j, (j - 1) % size) for j in range(size)]  # after t steps device d holds d + t
