"""Run one conversion on a simulated 3-node Ray cluster (``ray.cluster_utils.Cluster``).

Used by ``test_ray_exec.py`` in a subprocess of its own: a process joins one Ray instance at a
time, and the test session already holds the shared local instance (``ray_session``), so the
cluster lives and dies with this process instead. Prints the report's executor section and the
node ids the tasks ran on as one JSON line.

Usage: ``python tests/execute/_cluster_run.py SRC OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from shardfix.execute.ray import local_ray_env


def main() -> int:
    src, out = sys.argv[1], sys.argv[2]
    os.environ.update(local_ray_env())  # loopback only, auth mode explicit, no usage stats
    from ray.cluster_utils import Cluster

    from shardfix.api import convert
    from shardfix.options import ConvertOptions

    tmp = tempfile.mkdtemp(prefix="sfxc-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp  # sessions and Ray's address file under our own dir, not /tmp/ray
    os.makedirs(os.path.join(tmp, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        report = convert(src, out, ConvertOptions(
            vocab_size=1000, max_shard_size="64KB", executor="ray", ray_address=cluster.address, progress=False))
        import ray

        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        ray.shutdown()
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"executor": report["executor"], "alive_nodes": nodes,
                      "node_ids": sorted({f["node_id"] for f in report["outputs"]["files"]})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
