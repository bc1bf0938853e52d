"""Global batches of jaxkd.data as one process of a multi-process run sees them.

Run as a script (one per process) by tests/data/test_batches.py:
  python _multiprocess_data.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT.npz
Process 0 writes the gathered global arrays (helpers.collect_global_batches) to OUT.npz.
"""
import sys

import numpy as np

import helpers  # this script's directory is on sys.path; helpers creates no array at import


def main(process_id: int, num_processes: int, devices: int, port: int, out_path: str) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = helpers.collect_global_batches(mesh, jax.process_index(), jax.process_count())
    if jax.process_index() == 0:
        np.savez(out_path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
