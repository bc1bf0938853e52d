"""Data-parallel placement: mesh, shardings, global batches, compiled steps, distributed start.

One 1-D mesh axis over all devices of all processes. Batches are split along their rows; the
student state is replicated, or sharded FSDP-style (`fsdp=True`) when it is too large to copy
to every device; a large teacher can be sharded the same way with `fsdp_param_shardings`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Environment variables that mark a launch which jax.distributed.initialize() detects by itself.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID",
                "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")
_FSDP_MIN_SIZE = 2**18  # elements; smaller leaves are cheaper replicated than gathered


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes).

    Auto axes: under jax.make_mesh's default Explicit axes, nn.Embed on batch-sharded ids fails.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (axis,), axis_types=(jax.sharding.AxisType.Auto,))


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D data mesh, got axes {mesh.axis_names}; use make_mesh")
    return mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the mesh axis, other dimensions whole."""
    return NamedSharding(mesh, P(_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], size: int, axis: str, min_size: int) -> P:
    """Shard the largest dimension divisible by `size`; replicate small or indivisible leaves."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda d: shape[d])
    return P(*([None] * dim), axis)


def fsdp_param_shardings(mesh: Mesh, params_abstract: Any, min_size: int = _FSDP_MIN_SIZE) -> Any:
    """Per-leaf shardings for a tree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
    axis = _axis(mesh)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), mesh.size, axis, min_size)),
        params_abstract)


def tree_shardings(mesh: Mesh, tree: Any, fsdp: bool = False,
                   min_size: int = _FSDP_MIN_SIZE) -> Any:
    """Shardings for every leaf of `tree`: replicated, or FSDP (optimizer moments follow params)."""
    if fsdp:
        return fsdp_param_shardings(mesh, tree, min_size)
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, tree)


def _copy_to(tree: Any, shardings: Any) -> Any:
    # A fresh copy: the compiled steps donate the state, which must not free the caller's arrays
    # (device_put, even with may_alias=False, reuses the source buffer on its own device).
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def _from_host(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return _copy_to(x, sharding)
    host = np.asarray(x)  # every process holds the same value; each fills its own devices
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` with every leaf on its sharding (also across processes)."""
    if jax.process_count() == 1:
        return _copy_to(tree, shardings)
    return jax.tree.map(_from_host, tree, shardings)


def shard_state(state: Any, mesh: Mesh, fsdp: bool = False, min_size: int = _FSDP_MIN_SIZE) -> Any:
    """A copy of a TrainState (or any tree) on `mesh`: replicated, or FSDP-sharded."""
    return place(state, tree_shardings(mesh, state, fsdp, min_size))


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """One global, row-sharded batch from each process's own rows (equal row counts per process)."""
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    out = {}
    for key, rows in local_batch.items():
        rows = np.asarray(rows)
        if rows.ndim == 0 or rows.shape[0] % local_devices:
            raise ValueError(f"batch[{key!r}] has shape {rows.shape}: its rows must split evenly over "
                             f"this process's {local_devices} devices; pad the batch")
        out[key] = jax.make_array_from_process_local_data(sharding, rows)
    return out


def compile_step(step_fn: Callable, arg_shardings: tuple, out_shardings: Any,
                 donate_argnums: tuple[int, ...] = (0,)) -> Callable:
    """jax.jit with explicit shardings; argument 0 (the state) is donated by default.

    Donation frees the input state: place it with `shard_state`, which copies.
    """
    return jax.jit(step_fn, in_shardings=arg_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)


def jit_distill_step(step_fn: Callable, mesh: Mesh, state_shardings: Any,
                     teacher_shardings: Any) -> Callable:
    """(state, teacher_params, batch, rng) -> (state, metrics), state donated, metrics replicated."""
    rep = replicated(mesh)
    return compile_step(step_fn, (state_shardings, teacher_shardings, batch_sharding(mesh), rep),
                        (state_shardings, rep))


def jit_finetune_step(step_fn: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """(state, batch, rng) -> (state, metrics), state donated, metrics replicated."""
    rep = replicated(mesh)
    return compile_step(step_fn, (state_shardings, batch_sharding(mesh), rep),
                        (state_shardings, rep))


def apply_distributed(dist) -> None:
    """The run config's `distributed` section, applied in this one place, before any JAX work:
    the simulated CPU device count (`cpu_devices`), then jax.distributed (`initialize`, or the
    coordinator, process count and id). Applying it twice is harmless."""
    if dist.cpu_devices and jax.config.jax_num_cpu_devices != dist.cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", dist.cpu_devices)
        except RuntimeError as err:
            raise ValueError(f"distributed.cpu_devices={dist.cpu_devices}: this process already "
                             f"runs JAX on {jax.device_count()} devices; set it before any JAX "
                             "work, or leave it unset") from err
    if (dist.initialize or dist.coordinator_address is not None) and not jax.distributed.is_initialized():
        init_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Start jax.distributed for multi-process runs; call before any other JAX work.

    Nothing given: a no-op for a single process, and argument-free initialisation where the
    cluster describes itself (Cloud TPU VMs, JAX_COORDINATOR_ADDRESS, Open MPI).
    """
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        if any(os.environ.get(name) for name in _CLUSTER_ENV):
            jax.distributed.initialize()
        return
    if None in given:
        raise ValueError("init_distributed needs all of coordinator_address ('host:port'), "
                         "num_processes and process_id, or none of them; got "
                         f"coordinator_address={coordinator_address!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"init_distributed: num_processes must be a positive integer, "
                         f"got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"init_distributed: process_id must be in [0, {num_processes}), "
                         f"got {process_id!r}")
    if ":" not in coordinator_address:
        raise ValueError(f"init_distributed: coordinator_address must be 'host:port', "
                         f"got {coordinator_address!r}")
    if num_processes == 1:
        return
    # CPU devices of different processes talk through gloo; other backends ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


class OtherProcessFailed(RuntimeError):
    """Process 0 raised in `on_process0`; its own log holds the reason."""


def on_process0(fn: Callable[[], Any], what: str) -> None:
    """Run `fn()` on process 0 only; then every process raises when it raised (process 0 its
    own exception, the others `OtherProcessFailed` naming `what`), so that none of them goes on
    alone into a collective. One process: just `fn()`."""
    if jax.process_count() == 1:
        fn()
        return
    from jax.experimental import multihost_utils
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # pylint: disable=broad-except
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.array(error is not None, np.int32))
    if error is not None:
        raise error
    if int(failed):
        raise OtherProcessFailed(f"process 0 failed at {what}; its log says why")


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([flag], np.int32))))
