from cluster import local


def test_more_logical_cpus_than_running_workers_need(monkeypatch):
    monkeypatch.setattr(local, "physical_cores", lambda: 2)
    # 2 trials x 1 worker: 2 running groups + 2 shutting down + headroom, never exactly the cores
    assert local.logical_cpus(2, 1) == 6
    assert local.logical_cpus(1, 0.5) == 3
    assert local.logical_cpus(1, 1) > local.physical_cores()


def test_threads_share_the_cores_between_running_workers(monkeypatch):
    monkeypatch.setattr(local, "physical_cores", lambda: 8)
    assert local.threads_per_worker(2, 1) == 4
    assert local.threads_per_worker(4, 2) == 1
    assert local.threads_per_worker(16, 1) == 1


def test_workers_are_told_the_embedded_clusters_address(monkeypatch):
    """Ray Train's PlacementGroupCleaner finds the State API through RAY_ADDRESS in its worker; without it,
    a second Ray on the machine makes the lookup fail and stopped trials' CPUs leak. The embedded cluster is
    started even where `ray start` recorded another on this machine (here: one that does not answer), which a
    bare ray.init would join."""
    import os

    import ray
    from ray._private import services

    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: "127.0.0.1:1")
    started = local.connect(None, 1, 1)
    try:
        assert started and "RAY_GCS_SERVER_PORT" not in os.environ and "RAY_ADDRESS" not in os.environ

        @ray.remote
        def from_a_worker():
            from ray.util.state import list_nodes
            return dict(os.environ), len(list_nodes())

        environment, nodes = ray.get(from_a_worker.remote())
        address = environment.get("RAY_ADDRESS")
        # inherited from the raylet (no job runtime env, so the raylet's pre-started workers serve actors)
        for key, value in {**local.WORKER_ENV, **local.EMBEDDED_ENV, **local.LOOPBACK_ENV}.items():
            assert environment.get(key) == value, key
        assert ray.get_runtime_context().runtime_env == {}
        assert address.rsplit(":", 1)[1] == ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]   # its port
        assert nodes == 1
    finally:
        local.shutdown(started)
