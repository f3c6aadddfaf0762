"""GPU parameters: assignment to threads, RELION's --gpu syntax, %(GPU)s, device checks, one worker per GPU."""

from __future__ import annotations

import os
import warnings

import pytest

from cryodask.cluster import assign_gpus
from cryodask.cluster.gpu import (GpuSyntaxWarning, check_gpus, gpu_task_resources, local_gpu_client,
                                  local_gpu_worker_spec, parse_gpu_list, parse_gpu_option, substitute_gpu,
                                  visible_devices)
from cryodask.errors import UserError

# ---------------------------------------------------------------------------------------------
# assignment (Scipion's rules; thread 0 is the master)


@pytest.mark.parametrize("n_threads, gpus, expected", [
    (3, "0 1", [[], [0], [1]]),
    (5, "0 1", [[], [0], [1], [0], [1]]),
    (3, "0 1 2 3", [[], [0, 1], [2, 3]]),
    # more GPUs than worker threads: contiguous chunks, the remainder one each to the first threads
    (3, "0 1 2", [[], [0, 1], [2]]),
    (4, "0 1 2 3 4 5 6", [[], [0, 1, 2], [3, 4], [5, 6]]),
    (2, "0 1 2", [[], [0, 1, 2]]),
    # fewer GPUs than worker threads: round-robin sharing
    (4, "3", [[], [3], [3], [3]]),
    (6, "0 1", [[], [0], [1], [0], [1], [0]]),
    (4, "1 3 5", [[], [1], [3], [5]]),
    # order kept as given; commas are separators too
    (3, "2,0", [[], [2], [0]]),
    (3, [1, 0], [[], [1], [0]]),
    # a single thread is master and worker: all GPUs
    (1, "0 1", [[0, 1]]),
    # no GPUs: nobody gets one
    (3, "", [[], [], []]),
    (2, None, [[], []]),
])
def test_assign_gpus(n_threads, gpus, expected):
    assert assign_gpus(n_threads, gpus) == expected


def test_assign_gpus_uses_every_gpu_evenly():
    for n_threads in range(2, 9):
        for n_gpus in range(1, 9):
            out = assign_gpus(n_threads, list(range(n_gpus)))
            assert out[0] == []
            used = [g for t in out[1:] for g in t]
            assert set(used) == set(range(n_gpus))  # every GPU is used
            counts = [used.count(g) for g in range(n_gpus)]
            assert max(counts) - min(counts) <= 1  # ... as evenly as possible
            sizes = [len(t) for t in out[1:]]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_assign_gpus_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_gpus(0, "0")
    with pytest.raises(UserError, match="'x' in '0 x' is not a GPU id"):
        assign_gpus(3, "0 x")
    with pytest.raises(UserError, match="not a GPU id"):
        assign_gpus(3, [0, -1])


# ---------------------------------------------------------------------------------------------
# --gpu: Scipion's and RELION's syntax


@pytest.mark.parametrize("text, expected", [
    ("0 1", [0, 1]),
    ("0:1", [0, 1]),
    ("0,1:2,3", [0, 1, 2, 3]),
    ("0:0:1:1", [0, 0, 1, 1]),  # two workers per GPU, as RELION's two ranks per GPU
    (" 2 ", [2]),
    ("3", [3]),
    ("", None),  # --gpu alone: all GPUs
    (None, None),
])
def test_parse_gpu_option(text, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        assert parse_gpu_option(text) == expected


@pytest.mark.parametrize("text", ["0,1,2,3", "0,1"])
def test_relion_comma_list_warns(text):
    # RELION gives every rank all of these GPUs (issues #427, #1056): translated, with a warning
    with pytest.warns(GpuSyntaxWarning, match=r"every MPI rank all of GPUs .*#427.*one worker per GPU"):
        ids = parse_gpu_option(text)
    assert ids == [int(x) for x in text.split(",")]


def test_relion_single_gpu_with_comma_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_gpu_option("1,1") == [1, 1]


@pytest.mark.parametrize("text, message", [("0::1", "empty rank"), ("0:a", "'a'"), ("gpu0", "'gpu0'")])
def test_bad_gpu_option(text, message):
    with pytest.raises(UserError, match=message) as err:
        parse_gpu_option(text)
    assert err.value.where == "--gpu"


def test_parse_gpu_list():
    assert parse_gpu_list("0 1  2") == [0, 1, 2]
    assert parse_gpu_list("0,1") == [0, 1]
    assert parse_gpu_list(None) == []
    with pytest.raises(UserError, match="'1.5'"):
        parse_gpu_list("0 1.5")


# ---------------------------------------------------------------------------------------------
# %(GPU)s


@pytest.mark.parametrize("command, gpus, expected", [
    ("relion_refine --gpu %(GPU)s --j 4", [0, 1], "relion_refine --gpu 0 1 --j 4"),
    ("CUDA_VISIBLE_DEVICES=%(GPU)s ctffind", [2, 3], "CUDA_VISIBLE_DEVICES=2,3 ctffind"),
    ("env CUDA_VISIBLE_DEVICES='%(GPU)s' gctf --gid %(GPU)s", "0 1",
     "env CUDA_VISIBLE_DEVICES='0,1' gctf --gid 0 1"),
    ("motioncor --gpu %(GPU)s", [5], "motioncor --gpu 5"),
    ("no placeholder; 50% done", [0], "no placeholder; 50% done"),
    ("printf '%d %s' 1 x --gpu %(GPU)s", [1], "printf '%d %s' 1 x --gpu 1"),
])
def test_substitute_gpu(command, gpus, expected):
    assert substitute_gpu(command, gpus) == expected


def test_substitute_gpu_per_thread():
    # the pipeline case: each thread's command gets its own GPUs
    cmds = [substitute_gpu("CUDA_VISIBLE_DEVICES=%(GPU)s step", g) for g in assign_gpus(3, "0 1 2 3")[1:]]
    assert cmds == ["CUDA_VISIBLE_DEVICES=0,1 step", "CUDA_VISIBLE_DEVICES=2,3 step"]


# ---------------------------------------------------------------------------------------------
# devices


def test_missing_cupy_is_one_line_user_error():
    # CuPy is not installed in CI: the real check runs
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError) as err:
        check_gpus([0])
    assert err.value.where == "--gpu"
    assert "CuPy is not installed" in err.value.what and "without --gpu" in err.value.what
    assert "\n" not in str(err.value)


def test_missing_gpu_through_cli(tmp_path, capsys):
    # the same through a command: exit 2, one line, no traceback
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    from cryodask.cli import main

    assert main(["cluster", "test", "local-gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cryodask: error: --gpu: CuPy is not installed") and err.count("\n") == 1


def test_unknown_gpu_ids():
    with pytest.raises(UserError, match=r"GPU 7 does not exist: this machine has 2 GPUs \(0-1\)"):
        check_gpus([0, 7], check_devices=False, n_devices=2)
    with pytest.raises(UserError, match="GPU 2, 3 does not exist"):
        check_gpus([3, 2, 1], check_devices=False, n_devices=2)
    with pytest.raises(UserError, match="this machine has no GPU"):
        check_gpus([0], check_devices=False, n_devices=0)
    assert check_gpus([1, 0], check_devices=False, n_devices=2) == [1, 0]
    assert check_gpus(None, check_devices=False, n_devices=3) == [0, 1, 2]


def test_visible_devices_follow_the_parent_mask(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices([0, 1]) == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert visible_devices([2, 0]) == "6,4"
    assert visible_devices([1], parent="") == "1"
    # this process may use physical GPUs 2 and 3: its GPU 1 is physical 3
    assert visible_devices([1], parent="2,3") == "3"
    assert visible_devices([0, 1], parent="GPU-aa,GPU-bb") == "GPU-aa,GPU-bb"
    with pytest.raises(UserError, match="GPU 2 is not among the 2 GPUs"):
        visible_devices([2], parent="2,3")


def test_worker_spec_one_worker_per_gpu():
    spec = local_gpu_worker_spec([0, 1], memory_limit=2**30)
    assert list(spec) == ["gpu-0", "gpu-1"]
    opts = [spec[k]["options"] for k in spec]
    assert [o["env"]["CUDA_VISIBLE_DEVICES"] for o in opts] == ["0", "1"]
    assert all(o["resources"] == {"GPU": 1} and o["nthreads"] == 1 for o in opts)
    # more workers than GPUs share them round-robin; fewer take chunks
    spec = local_gpu_worker_spec([0, 1], n_workers=4, memory_limit=2**30)
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in spec.values()] == ["0", "1", "0", "1"]
    spec = local_gpu_worker_spec([0, 1, 2], n_workers=2, memory_limit=2**30)
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in spec.values()] == ["0,1", "2"]


def _worker_view() -> tuple[str, int]:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), os.getpid()


def test_local_gpu_cluster_with_fake_devices():
    # real worker processes, fake GPU ids 0 and 1: each sees only its own and advertises GPU=1
    with local_gpu_client("0 1", check_devices=False, n_devices=2, memory_limit=2**30) as client:
        info = client.scheduler_info()["workers"]
        seen = client.run(_worker_view)
        by_name = {info[a]["name"]: seen[a] for a in seen}
        assert sorted(by_name) == ["gpu-0", "gpu-1"]
        assert by_name["gpu-0"][0] == "0" and by_name["gpu-1"][0] == "1"
        assert by_name["gpu-0"][1] != by_name["gpu-1"][1] != os.getpid()  # separate processes
        assert all(w["resources"] == {"GPU": 1} for w in info.values())
        # GPU tasks ask for the resource: two at once run on the two workers, one each
        assert gpu_task_resources(client) == {"GPU": 1}
        futs = [client.submit(_slow_view, i, resources=gpu_task_resources(client), pure=False) for i in range(2)]
        assert sorted(f.result()[0] for f in futs) == ["0", "1"]


def _slow_view(i: int) -> tuple[str, int]:
    import time

    time.sleep(0.5)  # both tasks overlap, so each holds its worker's one GPU
    return _worker_view()
