"""A Ray worker node on this machine, held until it is killed: `python ray_worker_node.py --address 127.0.0.1:6379 ...`.

Started the way Ray's own test clusters add a node (`ray.cluster_utils.Cluster.add_node`: a `ray._private.node.Node`
that is not the head). `ray start --address` cannot add one on loopback: with the single-machine setting it refuses
to join a cluster, and without it it rewrites 127.0.0.1 to the machine's other address.
"""

from __future__ import annotations

import argparse
import json
import signal

from ray._private.node import Node
from ray._private.parameter import RayParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="the head's GCS, host:port")
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--resources", default="{}", help="custom resources, as JSON")
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--object-store-memory", type=int, default=10**9)
    args = parser.parse_args()
    params = RayParams(
        gcs_address=args.address, node_ip_address="127.0.0.1", num_cpus=args.num_cpus, num_gpus=0,
        resources=json.loads(args.resources), temp_dir=args.temp_dir, object_store_memory=args.object_store_memory,
        min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=False,
        dashboard_agent_listen_port=None,
    )
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(f"node {node.node_id} is up", flush=True)
    signal.pause()  # the node's processes descend from this one: killing its process tree takes them all


if __name__ == "__main__":
    main()
