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
