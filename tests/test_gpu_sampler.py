"""GPU use measured in the trials (trial/gpu_sampler.py) and aggregated per sweep (utilization.py).

No machine here can run NVML (no GPU, no driver), so a stand-in ``pynvml`` module is put in
``sys.modules``: it returns scripted utilization and memory values per device. That stand-in
is the only part no machine here can run: the real binding's calls (``nvmlInit``,
``nvmlDeviceGetUtilizationRates``, ...) are checked against nvidia-ml-py's names only.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from grpo_ray.trial.gpu_sampler import GIB, GpuSampler, visible_indices
from grpo_ray.views.utilization import summary_line, utilization


class NVMLError(Exception):
    pass


def fake_nvml(utils: dict[int, list[float]], mem_gib: dict[int, float] | None = None,
              uuids: list[str] | None = None, init_error: bool = False,
              total_gib: dict[int, float] | None = None) -> types.ModuleType:
    """A pynvml whose device i reports ``utils[i]`` one value per call (the last one repeats)."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    uuids = uuids or [f"GPU-{i:08d}-aaaa-bbbb" for i in range(len(utils))]
    calls = {i: 0 for i in utils}
    m.shutdowns = 0

    def init():
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def util(h):
        vals = utils[h]
        v = vals[min(calls[h], len(vals) - 1)]
        calls[h] += 1
        return SimpleNamespace(gpu=v, memory=0)

    def shutdown():
        m.shutdowns += 1

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: len(utils)
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # the handle is the index
    m.nvmlDeviceGetUUID = lambda h: uuids[h].encode()  # older bindings return bytes
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=int((mem_gib or {}).get(h, 1.0) * GIB),
                                                          total=int((total_gib or {}).get(h, 80.0) * GIB))
    return m


def test_samples_split_into_overall_and_during_steps(monkeypatch):
    nvml = fake_nvml({0: [10, 20, 60, 80]}, mem_gib={0: 15.5})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    first_step = {"at": None}
    s = GpuSampler(interval=3600, steps_since=lambda: first_step["at"], visible="0").start()  # no thread tick
    try:
        s.sample()
        s.sample()  # start-up: 10, 20
        first_step["at"] = 0.0  # the trial's first step (long before now)
        s.sample()
        s.sample()  # steps: 60, 80
        m = s.metrics()
    finally:
        s.stop()
    assert m["gpu_util_mean"] == pytest.approx(42.5) and m["gpu_util_steps_mean"] == pytest.approx(70)
    assert m["gpu_samples"] == 4 and m["gpu_steps_samples"] == 2
    assert m["gpu_mem_used_max_gib"] == pytest.approx(15.5)
    assert nvml.shutdowns == 1


def test_a_first_step_still_ahead_is_not_during_steps(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: [50]}))
    s = GpuSampler(interval=3600, steps_since=lambda: 4e12, visible="0").start()
    s.sample()
    s.stop()
    assert "gpu_util_steps_mean" not in s.metrics() and s.metrics()["gpu_steps_samples"] == 0


def test_the_thread_samples_every_interval(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: [30]}))
    import time

    with GpuSampler(interval=0.01, visible="0") as s:
        thread = s._thread
        assert thread is not None and thread.daemon  # never holds the trial's process open
        deadline = time.time() + 5
        while not s.metrics() and time.time() < deadline:
            time.sleep(0.01)
    n = s.metrics()["gpu_samples"]
    assert n >= 1 and s.metrics()["gpu_util_mean"] == 30
    assert not thread.is_alive()  # stopped with the trial
    time.sleep(0.05)
    assert s.metrics()["gpu_samples"] == n


def test_visible_devices_map_to_nvml_indices(monkeypatch):
    uuids = ["GPU-1111aaaa-0000", "GPU-2222bbbb-0000", "GPU-3333cccc-0000", "GPU-2222bbbc-0000"]
    nvml = fake_nvml({0: [0], 1: [0], 2: [0], 3: [0]}, uuids=uuids)
    assert visible_indices(nvml, None) == [0, 1, 2, 3]  # unset: every GPU
    assert visible_indices(nvml, "") == []  # Ray's value for a trial without a GPU
    assert visible_indices(nvml, "2,0") == [2, 0]
    assert visible_indices(nvml, "7") == []  # no such GPU
    assert visible_indices(nvml, "GPU-3333cccc-0000") == [2]
    assert visible_indices(nvml, "GPU-1111, GPU-2222bbbc") == [0, 3]  # unique prefixes, as CUDA takes them
    assert visible_indices(nvml, "GPU-2222") == []  # ambiguous prefix
    assert visible_indices(nvml, "MIG-5555dddd-0000") == []


def test_a_trial_samples_only_its_own_gpus(monkeypatch):
    # GPUs 0 and 2 are this trial's (CUDA_VISIBLE_DEVICES); GPU 1 belongs to another trial.
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: [20], 1: [100], 2: [40]}, mem_gib={1: 70.0, 2: 9.0}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    s = GpuSampler(interval=3600).start()
    s.sample()
    s.stop()
    assert s.metrics()["gpu_util_mean"] == 30 and s.metrics()["gpu_mem_used_max_gib"] == pytest.approx(9.0)


def test_the_cards_size_is_the_smallest_of_the_trials_gpus(monkeypatch):
    """For the packing advice: how much a card holds (a trial on two GPUs fits the smaller); a
    binding without ``total`` gives no size and still samples."""
    nvml = fake_nvml({0: [20], 1: [40]}, total_gib={0: 141.0, 1: 80.0})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(interval=3600, visible="0,1") as s:
        s.sample()
    assert s.metrics()["gpu_mem_total_gib"] == pytest.approx(80.0)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=GIB)
    with GpuSampler(interval=3600, visible="0") as s:
        s.sample()
    assert "gpu_mem_total_gib" not in s.metrics() and s.metrics()["gpu_util_mean"] == 20


def test_no_pynvml_measures_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    s = GpuSampler(interval=0.01, visible="0").start()
    s.sample()
    s.stop()
    assert s.metrics() == {} and s._thread is None


def test_nvml_that_cannot_start_measures_nothing(monkeypatch):
    nvml = fake_nvml({0: [50]}, init_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(interval=0.01, visible="0") as s:
        s.sample()
    assert s.metrics() == {} and nvml.shutdowns == 0


def test_a_trial_without_a_gpu_measures_nothing(monkeypatch):
    nvml = fake_nvml({0: [50]})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(interval=0.01, visible="") as s:
        s.sample()
    assert s.metrics() == {} and s._thread is None and nvml.shutdowns == 1  # NVML closed again


def test_a_failing_read_skips_the_sample(monkeypatch):
    nvml = fake_nvml({0: [50]})

    def broken(h):
        raise NVMLError("GPU is lost")

    nvml.nvmlDeviceGetUtilizationRates = broken
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(interval=3600, visible="0") as s:
        s.sample()
    assert s.metrics() == {}


def _t(start, first, end, pid, gpus="0", node="n1", gpu=None):
    m = {"trial_started_at": start, "first_step_at": first, "reported_at": end, "worker_pid": pid,
         "model_reused": 0.0, "gpus": gpus, "node": node}
    return (m | (gpu or {}), True)


def _g(overall, n, steps, n_steps, mem=10.0, total=None):
    return {"gpu_util_mean": overall, "gpu_samples": float(n), "gpu_util_steps_mean": steps,
            "gpu_steps_samples": float(n_steps), "gpu_mem_used_max_gib": mem} | (
        {"gpu_mem_total_gib": total} if total else {})


def test_utilization_weights_trials_by_their_samples_per_device_and_overall():
    # GPU 0: two packed trials, each sampling the whole card; GPU 1: one trial; one trial without samples.
    u = utilization([_t(0, 10, 110, 1, gpu=_g(20, 100, 30, 60, mem=15.0)),
                     _t(0, 20, 120, 2, gpu=_g(26, 300, 40, 180, mem=17.5)),
                     _t(0, 60, 120, 3, gpus="1", gpu=_g(10, 100, 16, 50, mem=35.0)),
                     _t(0, 60, 120, 4, gpus="2")])
    dev0 = u["gpu_util_per_device"]["n1/gpu0"]
    assert dev0["gpu_util_mean"] == pytest.approx((20 * 100 + 26 * 300) / 400, abs=0.05)  # 24.5: a mean, not 46
    assert dev0["gpu_util_steps_mean"] == pytest.approx((30 * 60 + 40 * 180) / 240, abs=0.05)
    assert dev0["gpu_mem_used_max_gib"] == 17.5
    assert set(u["gpu_util_per_device"]) == {"n1/gpu0", "n1/gpu1"}  # GPU 2 reported nothing
    assert u["gpu_util_mean"] == pytest.approx((2000 + 7800 + 1000) / 500, abs=0.05)
    assert u["gpu_util_steps_mean"] == pytest.approx((1800 + 7200 + 800) / 290, abs=0.05)
    assert u["gpu_mem_used_max_gib"] == 35.0 and u["gpu_samples"] == 500
    line = summary_line(u)
    assert "GPU util 34% during steps, 22% overall" in line and line.index("trials per device-hour") < line.index(
        "GPU util")


def test_utilization_without_gpu_samples_says_nothing_of_them():
    u = utilization([_t(0, 10, 110, 1), _t(0, 10, 110, 2, gpu={"gpu_samples": 0.0, "gpu_util_mean": 0.0})])
    assert "gpu_util_mean" not in u and "gpu_util_per_device" not in u
    assert "GPU util" not in summary_line(u)


def test_status_and_report_show_gpu_utilization():
    from grpo_ray.views.html_report import _utilization_html
    from grpo_ray.views.status import TrialStatus, status_table

    lasts = [_t(0, 10, 110, 1, gpu=_g(20, 100, 30, 60))[0], _t(0, 10, 110, 2, gpus="1", gpu=_g(10, 100, 16, 50))[0]]
    table = status_table([TrialStatus(f"t{i}", "TERMINATED", {}, last, 0) for i, last in enumerate(lasts)])
    assert "GPU util 24% during steps, 15% overall" in str(table.caption)
    page = _utilization_html(SimpleNamespace(trials=[SimpleNamespace(last=m, state="finished") for m in lasts]))
    assert "GPU utilization during steps (%)" in page and "n1/gpu1" in page and "NVML" in page


def test_a_real_trial_reports_its_gpu_samples(monkeypatch, tiny_model_dir):
    """trial/run.py: the sampler runs through a real CPU trial (tiny model, hf backend) and every
    report carries its numbers; samples before the first step are not "during steps"."""
    from conftest import REPO
    from grpo_ray.config.load import load_spec
    from grpo_ray.trial import gpu_sampler
    from grpo_ray.trial.run import run_trial

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: [5, 60, 90]}, mem_gib={0: 3.0}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    made: list[GpuSampler] = []

    class Sampled(GpuSampler):  # one sample before the trial's first step, then one per report
        def __init__(self, **kw):
            super().__init__(interval=3600, **kw)
            made.append(self)

        def start(self):
            super().start()
            self.sample()  # start-up: 5%, no first step yet
            return self

        def metrics(self):
            self.sample()
            return super().metrics()

    monkeypatch.setattr("grpo_ray.trial.run.GpuSampler", Sampled)
    reports = []
    run_trial({"sft.max_steps": 1, "grpo.max_steps": 2, "grpo.report_every": 1}, load_spec(REPO / "sweeps" / "smoke.yaml"),
              report=lambda m, d: reports.append(dict(m)))
    assert [(r["gpu_samples"], r["gpu_steps_samples"]) for r in reports] == [(2, 1), (3, 2)]
    last = reports[-1]
    assert last["gpu_util_steps_mean"] == 75 and last["gpu_util_mean"] == pytest.approx((5 + 60 + 90) / 3)
    assert last["gpu_mem_used_max_gib"] == pytest.approx(3.0)
    assert made[0]._thread is None and made[0]._nvml is None  # stopped with the trial
    assert gpu_sampler  # imported as the trial imports it


def test_the_most_trials_at_once_on_a_device_tells_packed_from_not():
    from grpo_ray.views import utilization as u_mod

    one_by_one = utilization([_t(0, 10, 100, 1), _t(100, 105, 200, 1), _t(0, 10, 150, 2, gpus="1")])
    packed = utilization([_t(0, 10, 100, 1), _t(5, 20, 120, 2), _t(100, 105, 200, 1)])
    assert one_by_one["trials_per_device_max"] == 1 and packed["trials_per_device_max"] == 2
    import doctest

    assert doctest.testmod(u_mod).failed == 0


def test_status_advises_packing_only_when_the_card_idles_and_twice_as_many_fit():
    """One gemma-3-270m trial per H200 (the warm-sweep spec: vLLM holds 0.25 of the card, 35 of
    141 GiB; the trial used 38.8): two fit, and the card was 4-9% busy, so pack. Not when the card
    is busy, when the trials already share it, when two would not fit, or when the spec's
    memory share is not known."""
    from grpo_ray.views.status import TrialStatus, advice, status_table

    def statuses(util, mem, packed=False):
        trials = [_t(0, 10, 110, 1, gpu=_g(util, 100, util, 90, mem=mem, total=141.0)),
                  _t(110, 112, 200, 1, gpu=_g(util, 100, util, 90, mem=mem, total=141.0))]
        if packed:
            trials.append(_t(5, 12, 100, 2, gpu=_g(util, 100, util, 90, mem=mem, total=141.0)))
        return [TrialStatus(f"t{i}", "TERMINATED", {}, m, 0) for i, (m, _) in enumerate(trials)]

    idle = statuses(8.0, 38.8)
    lines = advice(idle, 0.25)
    assert len(lines) == 1 and lines[0].startswith("GPU busy 8% during steps with one trial per GPU")
    assert "resources.gpu: 0.5" in lines[0] and "(42 of 141 GiB)" in lines[0]  # 35.25 + 2 x 3.55
    assert lines[0] in str(status_table(idle, 0.25).caption)
    assert advice(statuses(75.0, 38.8), 0.25) == []  # the card is busy
    # busy 55% alone still has room for a second (a 1.7B trial at 57-66% did 1.3x with two) ...
    assert advice(statuses(55.0, 38.8), 0.25)[0].startswith("GPU busy 55% during steps with one trial per GPU")
    assert advice(statuses(55.0, 38.8, packed=True), 0.25) == []  # ... but two at 55% are not idle
    # Already two per GPU and still idle: four, through max_trials_per_gpu, with the trade-off said.
    [four] = advice(statuses(8.0, 38.8, packed=True), 0.25)
    assert four.startswith("GPU busy 8% during steps with 2 trials per GPU, and 4 would fit (42 of 141 GiB)"), four
    assert "resources.max_trials_per_gpu: 4 with resources.gpu: auto, or resources.gpu: 0.25" in four
    assert "fewer finished trials" in four
    assert advice(statuses(8.0, 120.0), 0.7) == []  # 98.7 + 2 x 21.3 GiB > 0.9 x 141
    assert advice(idle) == []  # no spec to read the engine's share from
