"""A real two-node Ray cluster on this machine reading a job served by `pixcrawler serve`.

`ray.cluster_utils.Cluster` starts a head node and one more node (one CPU each, their own
raylet and object store) with a private RAY_TMPDIR; this process connects as the driver. Read
tasks spread over both nodes; every key arrives exactly once with the engine's pixels, also
when the worker reading a chunk is killed with SIGKILL in the middle of its download (Ray runs
the task again); `pixcrawler download --ray ADDRESS` writes the local export's files there. At
the end the cluster is shut down and none of its processes may remain.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from faults._proxy import Fault, proxied
from ray_helpers import (
    Killer,
    engine_rows,
    private_ray_tmpdir,
    ray_processes,
    ray_rows,
    require_ray,
    wait_gone,
)

from pixcrawler import load_dataset
from pixcrawler.cli import main

ray = require_ray()

pytestmark = pytest.mark.timeout(180)

SIZE = (24, 24)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head node and one more node, 1 CPU and a 150 MiB object store each; this driver."""
    import logging

    import ray.data
    from ray.cluster_utils import Cluster

    with private_ray_tmpdir():
        nodes = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20},
        )
        try:
            nodes.add_node(num_cpus=1, object_store_memory=150 << 20)
            ray.init(address=nodes.address, logging_level=logging.ERROR)
            context = ray.data.DataContext.get_current()
            saved = context.execution_options.preserve_order, context.enable_progress_bars
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            yield nodes
        finally:
            procs = ray_processes()
            ray.shutdown()
            nodes.shutdown()
            context.execution_options.preserve_order, context.enable_progress_bars = saved
            left = wait_gone(procs)
    assert procs and not left, f"cluster processes left running: {left}"


def test_every_key_once_across_two_nodes(cluster: Any, server: Any) -> None:
    dataset = load_dataset(
        "demo", api_key=server.api_key, base_url=server.url, image_size=SIZE, progress=False
    )
    ds = dataset.to_ray()
    got, want = ray_rows(ds), engine_rows(dataset)
    assert got.keys == want.keys and len(set(got.keys)) == 120
    np.testing.assert_array_equal(got.pixels(), want.pixels())
    assert re.search(r"Tasks per node: .*; 2 nodes used", ds.stats())  # both read chunks


def test_a_worker_killed_mid_read_still_gives_every_key_once(cluster: Any, server: Any) -> None:
    want = engine_rows(
        load_dataset(
            "demo", api_key=server.api_key, base_url=server.url, image_size=SIZE, progress=False
        )
    )
    stall = Fault("stall", match="/chunks/5", after_bytes=4096, seconds=120)
    with proxied(server.url, stall) as proxy:
        # Uncached: the engine pass above put chunk 5 in the cache, and this read must fetch it.
        dataset = load_dataset("demo", api_key=server.api_key, base_url=proxy.url,
                               image_size=SIZE, progress=False, cache_dir=False)  # fmt: skip
        killer = Killer(proxy, "/chunks/5")
        killer.start()
        try:
            got = ray_rows(dataset.to_ray())
        finally:
            killer.stop.set()
            killer.join(timeout=5)
        fetches = proxy.seen("/chunks/5")
    assert killer.killed is not None  # a worker died in the middle of chunk 5's download
    assert len(fetches) == 2 and fetches[0].fault == "stall"  # and the task ran again
    assert "range" not in fetches[1].headers  # in another process: nothing to resume
    assert got.keys == want.keys and len(set(got.keys)) == 120
    np.testing.assert_array_equal(got.pixels(), want.pixels())


def test_download_ray_at_the_cluster_address(cluster: Any, server: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PIXCRAWLER_API_KEY"] = server.api_key  # this command's environment only
    args = ["download", "demo", "--base-url", server.url, "--format", "parquet",
            "--image-size", "24x24", "--no-progress"]  # fmt: skip
    local = CliRunner().invoke(main, [*args, "--output-dir", str(tmp_path / "local")], env=env)
    assert local.exit_code == 0, local.output
    result = subprocess.run(
        [sys.executable, "-m", "pixcrawler", *args, "--output-dir", str(tmp_path / "ray"),
         "--ray", cluster.address],
        env=env, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "local" / "demo" / "data").iterdir())
    assert len(shards) == 8
    for shard in shards:
        assert (tmp_path / "ray" / "demo" / "data" / shard.name).read_bytes() == shard.read_bytes()
    key = server.api_key.encode()
    for proc in ray_processes():  # the cluster's processes ran the tasks: the key is not there
        for name in ("cmdline", "environ"):
            try:
                assert key not in Path(f"/proc/{proc.pid}/{name}").read_bytes(), proc
            except (FileNotFoundError, ProcessLookupError):
                pass
