"""Global batches of jaxkd.data as one process of a multi-process run sees them.

Run as a script (one per process) by tests/data/test_batches.py:
  python _multiprocess_data.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT.npz
Process 0 writes the gathered global arrays to OUT.npz. `collect` is also called in-process.
"""
import sys

import numpy as np

TRAIN_STEPS = 5
BATCH_SIZE = 8
MAX_SEQ_LEN = 32


def synthetic_encoded(num_examples: int = 29, seed: int = 0):
    """Token lists of random lengths; the same on every process."""
    from jaxkd import data  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, MAX_SEQ_LEN + 1, size=num_examples)
    ids = [list(rng.integers(1000, 2000, size=n)) for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    return data.Encoded.from_lists(ids, types, labels=rng.integers(0, 3, size=num_examples))


def collect(mesh, process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """Training and evaluation batches, assembled over `mesh` and gathered back to the host."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    from jaxkd import data, sharding  # pylint: disable=import-outside-toplevel

    encoded = synthetic_encoded()
    layout = dict(bucket_multiple=8, max_seq_len=MAX_SEQ_LEN, process_index=process_index,
                  process_count=process_count)
    train = data.TrainBatches(encoded, BATCH_SIZE, seed=7, **layout)
    named = [(f"train{i}", next(train)) for i in range(TRAIN_STEPS)]
    named += [(f"eval{i}", batch) for i, batch in enumerate(data.EvalBatches(encoded, BATCH_SIZE, **layout))]
    out = {}
    for name, batch in named:
        for key, value in sharding.global_batch(batch, mesh).items():
            out[f"{name}/{key}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return out


def main(process_id: int, num_processes: int, devices: int, port: int, out_path: str) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = collect(mesh, jax.process_index(), jax.process_count())
    if jax.process_index() == 0:
        np.savez(out_path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
