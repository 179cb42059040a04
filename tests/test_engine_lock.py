"""Packed trials start their vLLM engines one at a time per GPU (trial/engine_lock.py).

Real processes and real OS file locks; only the GPU ids are made up, since this machine has
no GPU (on one, visible_gpus() gives the cards' UUIDs, the same in every process).
"""

import multiprocessing as mp
import os
import signal
import time

from grpo_ray.trial.engine_lock import one_start_per_gpu, visible_gpus


def _start(gpus, lock_dir, hold_s, out, entered, timeout_s=1800.0):
    said = []
    with one_start_per_gpu(gpus, timeout_s=timeout_s, lock_dir=lock_dir, say=said.append) as lock:
        t0 = time.time()
        entered.set()
        time.sleep(hold_s)
        out.put((t0, time.time(), lock.waited_s, said))


def _starts(lock_dir, jobs):
    """Run ``(gpus, hold_s[, timeout_s])`` jobs, each started once the one before holds its locks
    (or, when it has to wait, has had 0.5 s to reach the lock); their (enter, leave, waited, said) in job order.
    A first job holds for 3 s or more: a spawned process on a busy 2-core CI machine takes a second to start."""
    ctx = mp.get_context("spawn")
    out, procs = ctx.Queue(), []
    for gpus, hold, *rest in jobs:
        entered = ctx.Event()
        procs.append(ctx.Process(target=_start, args=(gpus, lock_dir, hold, out, entered, *rest)))
        procs[-1].start()
        if not entered.wait(timeout=30):  # waiting for a lock: give it time to ask for it first
            time.sleep(0.5)
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return sorted(got, key=lambda r: r[0])  # entry order is job order wherever a lock decides it


def test_two_trials_on_one_gpu_start_one_after_the_other(tmp_path):
    first, second = _starts(tmp_path, [(["GPU-a"], 3.0), (["GPU-a"], 0.2)])
    assert second[0] >= first[1] - 0.05  # the second entered only when the first had left
    assert second[2] > 0.5 and "finish starting its vLLM engine" in second[3][0]
    assert first[3] == []


def test_trials_on_different_gpus_start_together(tmp_path):
    a, b = _starts(tmp_path, [(["GPU-a"], 3.0), (["GPU-b"], 0.2)])
    assert b[0] < a[1]  # overlapping start-ups
    assert a[3] == b[3] == []


def test_a_start_holding_two_gpus_waits_for_either(tmp_path):
    one, two = _starts(tmp_path, [(["GPU-b"], 3.0), (["GPU-a", "GPU-b"], 0.2)])
    assert two[0] >= one[1] - 0.05 and two[2] > 0.5


def test_a_crashed_start_releases_its_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    entered, out = ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_start, args=(["GPU-a"], tmp_path, 600, out, entered))
    holder.start()
    assert entered.wait(timeout=30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=10)
    t0 = time.time()
    with one_start_per_gpu(["GPU-a"], timeout_s=20, lock_dir=tmp_path, say=lambda m: None):
        assert time.time() - t0 < 5


def test_a_stuck_neighbour_costs_at_most_the_timeout(tmp_path):
    first, second = _starts(tmp_path, [(["GPU-a"], 5.0), (["GPU-a"], 0.1, 1.0)])
    assert second[0] < first[1]  # went ahead while the first still held the lock
    assert 0.9 <= second[2] < 3.0
    assert "starting without waiting longer" in second[3][-1]


def test_no_gpu_no_lock(tmp_path):
    assert visible_gpus() == []  # this machine (and CI) has no GPU
    with one_start_per_gpu([], lock_dir=tmp_path) as lock:
        assert lock.waited_s < 0.1
    assert list(tmp_path.iterdir()) == []


def test_a_lock_dir_that_cannot_be_made_starts_without_the_lock(tmp_path):
    (tmp_path / "taken").write_text("a file where the lock directory should be")
    said = []
    with one_start_per_gpu(["GPU-a"], lock_dir=tmp_path / "taken" / "locks", say=said.append) as lock:
        assert lock.waited_s < 1
    assert "starting without it" in said[0] and "taken" in said[0]


# ------------------------------------------------- the lock goes to the next trial at warm-up
# vLLM's worker sizes and allocates its KV cache, then calls compile_or_warm_up_model (CUDA
# graphs, kernel warm-up). No vLLM runs here (it needs a GPU), so a stand-in module with the
# same class and method is hooked, by the same code that hooks vllm.v1.worker.gpu_worker.
def _stand_in_worker(name: str, warmup_s: float = 0.0):
    import sys
    import types

    module = types.ModuleType(name)

    class Worker:
        def compile_or_warm_up_model(self, size=1):
            time.sleep(warmup_s)
            return {"compiled": size}

    module.Worker = Worker
    sys.modules[name] = module
    return module


def _start_engine(gpus, lock_dir, sizing_s, warmup_s, out, entered):
    from grpo_ray.trial.engine_lock import release_at_engine_warmup

    module = _stand_in_worker("stand_in_vllm_worker", warmup_s)
    with one_start_per_gpu(gpus, lock_dir=lock_dir, say=lambda m: None) as lock, \
            release_at_engine_warmup(lock.release, "stand_in_vllm_worker") as hooked:
        t0 = time.time()
        entered.set()
        time.sleep(sizing_s)  # the engine profiles the card and allocates its KV cache
        warm = time.time()
        module.Worker().compile_or_warm_up_model()
    out.put(("engine", t0, warm, time.time(), lock.waited_s, hooked))


def _engine_then_next(tmp_path, engine, engine_args):
    """Start ``engine(gpus, lock_dir, *engine_args, out, entered)`` on GPU-a, then, once it holds
    the lock, a next trial's start; what each put in the queue, as {"engine": ..., "next": ...}."""
    ctx = mp.get_context("spawn")
    out, entered = ctx.Queue(), ctx.Event()
    first = ctx.Process(target=engine, args=(["GPU-a"], tmp_path, *engine_args, out, entered))
    first.start()
    assert entered.wait(timeout=60)
    entered_too = ctx.Event()  # kept here: an Event the parent drops is gone before the child reads it
    second = ctx.Process(target=_start, args=(["GPU-a"], tmp_path, 0.1, out, entered_too))
    second.start()
    got = {r[0] if r[0] == "engine" else "next": r for r in (out.get(timeout=60), out.get(timeout=60))}
    for p in (first, second):
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


def test_the_next_trial_starts_while_this_engine_warms_up(tmp_path):
    got = _engine_then_next(tmp_path, _start_engine, (2.0, 4.0))
    _, t0, warm, loaded, _, hooked = got["engine"]
    entered_next = got["next"][0]
    assert hooked
    assert warm - 0.05 <= entered_next < loaded - 1.0, (t0, warm, entered_next, loaded)  # during the warm-up
    assert got["next"][2] > 0.5  # it did wait, for the sizing


def test_the_hook_calls_through_once_and_is_harmless_without_vllm():
    from grpo_ray.trial.engine_lock import _at_warmup, release_at_engine_warmup

    module = _stand_in_worker("stand_in_vllm_worker_2")
    calls = []
    with release_at_engine_warmup(lambda: calls.append(1), "stand_in_vllm_worker_2") as hooked:
        with release_at_engine_warmup(lambda: calls.append(2), "stand_in_vllm_worker_2"):  # hooked once
            assert module.Worker().compile_or_warm_up_model(size=8) == {"compiled": 8}
    assert hooked and calls == [1, 2]
    assert module.Worker().compile_or_warm_up_model() == {"compiled": 1} and calls == [1, 2]  # after the load
    assert _at_warmup == []
    with release_at_engine_warmup(lambda: calls.append(3), "no_such_vllm_module") as hooked:
        assert not hooked  # another vLLM: the lock is simply held to the end of the load


# ------------------------------------------------- a fixed KV cache (model.kv_cache_gib)
# vLLM's worker sizes its cache in determine_available_memory: by profiling the card, unless
# cache_config.kv_cache_memory_bytes is set. The stand-in records what that field held when
# the worker's own body ran, and sleeps as a profiling pass would.
def _stand_in_sizing_worker(name: str, profile_s: float = 0.0):
    import sys
    import types

    module = types.ModuleType(name)

    class CacheConfig:
        kv_cache_memory_bytes = None

    class Worker:
        def __init__(self):
            self.cache_config = CacheConfig()

        def determine_available_memory(self):
            self.seen = self.cache_config.kv_cache_memory_bytes
            time.sleep(profile_s)
            return self.seen or 123

        def compile_or_warm_up_model(self):
            return "warm"

    module.Worker = Worker
    sys.modules[name] = module
    return module


def test_a_fixed_kv_cache_is_set_before_the_worker_sizes_it_and_releases_the_lock_then():
    from grpo_ray.trial.engine_lock import _at_sizing, fixed_kv_cache

    module = _stand_in_sizing_worker("stand_in_vllm_sizing")
    released = []
    with fixed_kv_cache(1.5, lambda: released.append(1), "stand_in_vllm_sizing") as hooked:
        worker = module.Worker()
        assert released == []  # not before the engine reaches its sizing
        assert worker.determine_available_memory() == int(1.5 * 2**30)
    assert hooked and worker.seen == int(1.5 * 2**30) and released == [1]
    assert _at_sizing == []
    after = module.Worker()  # after the load: vLLM's own sizing again
    assert after.determine_available_memory() == 123 and after.seen is None
    with fixed_kv_cache(None, lambda: released.append(2), "stand_in_vllm_sizing") as hooked:
        unset = module.Worker()
        assert unset.determine_available_memory() == 123  # unset: vLLM profiles, the lock waits for warm-up
    assert not hooked and released == [1]
    with fixed_kv_cache(1.0, lambda: released.append(3), "no_such_vllm_module") as hooked:
        assert not hooked


def _start_fixed(gpus, lock_dir, profile_s, out, entered):
    from grpo_ray.trial.engine_lock import fixed_kv_cache, release_at_engine_warmup

    module = _stand_in_sizing_worker("stand_in_vllm_sizing_2", profile_s)
    with one_start_per_gpu(gpus, lock_dir=lock_dir, say=lambda m: None) as lock, \
            release_at_engine_warmup(lock.release, "stand_in_vllm_sizing_2"), \
            fixed_kv_cache(0.5, lock.release, "stand_in_vllm_sizing_2"):
        entered.set()
        time.sleep(1.0)  # the weights load: still under the lock
        worker = module.Worker()
        sized = time.time()
        worker.determine_available_memory()  # the profiling pass, the lock handed on
        worker.compile_or_warm_up_model()
        done = time.time()
    out.put(("engine", sized, done, worker.seen))


def test_with_a_fixed_kv_cache_the_next_trial_starts_during_this_ones_profiling(tmp_path):
    got = _engine_then_next(tmp_path, _start_fixed, (4.0,))
    _, sized, done, seen = got["engine"]
    assert seen == int(0.5 * 2**30)
    entered_next = got["next"][0]
    assert sized - 0.05 <= entered_next < done - 1.0, (sized, entered_next, done)  # during the profiling pass
    assert got["next"][2] > 0.5  # it waited for the weights' load


def test_a_queued_start_is_the_trials_phase_on_the_display(tmp_path):
    # What a packed trial shows while it waits (trial/phases.py): a neighbour (a real process)
    # holds the GPU's start lock; this start queues, says so as its phase, then starts.
    from grpo_ray.trial import phases

    posts = []

    class Board:
        class post:  # noqa: N801 - the shape of a Ray actor handle's method
            @staticmethod
            def remote(trial_id, text, at, new_phase):
                posts.append(text)

    ctx = mp.get_context("spawn")
    out, entered = ctx.Queue(), ctx.Event()
    neighbour = ctx.Process(target=_start, args=(["gpu-x"], tmp_path, 3.0, out, entered))
    neighbour.start()
    assert entered.wait(timeout=30)
    poster = phases.PhasePoster(Board, "t1")
    poster("loading the model")
    with phases.posting(poster), one_start_per_gpu(["gpu-x"], lock_dir=tmp_path, say=lambda m: None) as lock:
        assert lock.waited_s > 0.5
    neighbour.join(timeout=30)
    assert posts == ["loading the model", "loading the model: queued behind a packed neighbour's engine start",
                     "loading the model: starting the engine"]
    phases.post("outside a trial")  # no poster: nothing, and no error
    assert len(posts) == 3
