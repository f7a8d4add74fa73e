"""Multi-node serving on one machine: a two-node Ray cluster (`ray.cluster_utils.Cluster`), one
model replica per node (each reserves the only CPU its node offers), requests answered by both."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import pytest

from tests.serve_harness import free_port

pytestmark = pytest.mark.slow

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}


def test_two_nodes_each_run_a_replica_and_both_answer_requests():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve.app import build_app
    from serve.options import ServeOptions

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        port = free_port()
        # one proxy: both nodes share this machine's ports
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        options = ServeOptions(replicas=2, cpus_per_replica=1, max_batch=1, batch_wait_ms=0, max_queued=8)
        serve.run(build_app(options), name="unclip", route_prefix="/")

        def ask(i):
            body = json.dumps({"prompt": f"shape {i}", "seed": i, "response_format": "b64_json", **FAST}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, r.headers["x-unclip-node"], json.loads(r.read())

        # Rounds of eight concurrent requests until both nodes have answered (at most four): the
        # ingress's router learns the replicas asynchronously after `serve.run`, and a first round
        # can all go to the replica it knew first.
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        answers: list = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for start in range(0, 32, 8):
                answers += pool.map(ask, range(start, start + 8))
                if {node for _, node, _ in answers} == alive:
                    break
        assert all(status == 200 and len(body["data"]) == 1 for status, _, body in answers)
        nodes = {node for _, node, _ in answers}
        assert nodes == alive, (nodes, len(answers))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
