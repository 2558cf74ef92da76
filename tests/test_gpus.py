"""GPU inventory and placement: pure logic, no device needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from task_manager import gpus
from task_manager.gpus import GpuAllocator, detect_gpus, gpu_inventory, parse_gpus

# --- inventory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,1,3", ["0", "1", "3"]),
        (" 2 , 0 ", ["2", "0"]),
        ("GPU-5f3c1b2a-0000-1111-2222-333344445555", ["GPU-5f3c1b2a-0000-1111-2222-333344445555"]),
        ("", []),
        ("none", []),
        ("NONE", []),
    ],
)
def test_parse_gpus(text: str, expected: list[str]) -> None:
    assert parse_gpus(text) == expected


@pytest.mark.parametrize("text", ["0,,1", "0;1", "0,1,0", "a b"])
def test_parse_gpus_rejects_bad_lists(text: str) -> None:
    with pytest.raises(ValueError, match="GPU list"):
        parse_gpus(text)


def test_configured_inventory_wins_over_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "detect_gpus", lambda: pytest.fail("must not detect when configured"))
    assert gpu_inventory("1,2") == ["1", "2"]
    assert gpu_inventory("") == []


def test_detection_without_nvidia_smi_finds_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert detect_gpus() == []
    assert gpu_inventory(None) == []


def _fake_nvidia_smi(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_detection_reads_nvidia_smi_indices(tmp_path: Path) -> None:
    binary = _fake_nvidia_smi(tmp_path, 'printf "0\\n1\\n\\n3\\n"\n')
    assert detect_gpus(binary) == ["0", "1", "3"]


def test_detection_survives_a_failing_nvidia_smi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    binary = _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed" >&2; exit 9\n')
    assert detect_gpus(binary) == []
    assert "status 9" in caplog.text


def test_detection_survives_a_hanging_nvidia_smi(tmp_path: Path) -> None:
    binary = _fake_nvidia_smi(tmp_path, "exec sleep 5\n")
    assert detect_gpus(binary, timeout_s=0.2) == []


def test_real_nvidia_smi_agrees_when_present() -> None:
    if gpus.shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi on this machine")
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    assert len(detect_gpus()) == listed.count("GPU ")


# --- allocation --------------------------------------------------------------------------------


def test_one_replica_per_gpu_per_model() -> None:
    alloc = GpuAllocator(["0", "1"])
    assert alloc.allocate("echo/1", "echo-a") == "0"
    assert alloc.allocate("echo/1", "echo-b") == "1"
    assert alloc.allocate("echo/1", "echo-c") is None  # both GPUs hold an echo replica


def test_models_do_not_share_without_allow_sharing() -> None:
    alloc = GpuAllocator(["0"])
    assert alloc.allocate("echo/1", "e1") == "0"
    assert alloc.allocate("digits/1", "d1") is None


def test_models_share_with_allow_sharing_but_spread_first() -> None:
    alloc = GpuAllocator(["0", "1"], allow_sharing=True)
    assert alloc.allocate("echo/1", "e1") == "0"
    assert alloc.allocate("digits/1", "d1") == "1"  # the least loaded GPU
    assert alloc.allocate("resnet/1", "r1") == "0"  # all equally loaded: inventory order
    assert alloc.allocate("echo/1", "e2") == "1"  # not 0: an echo replica is there
    assert alloc.allocate("echo/1", "e3") is None
    assert {a.replica_id for a in alloc.replicas_on("0")} == {"e1", "r1"}


def test_versions_are_different_models() -> None:
    alloc = GpuAllocator(["0"], allow_sharing=True)
    assert alloc.allocate("echo/1", "a") == "0"
    assert alloc.allocate("echo/2", "b") == "0"


def test_release_frees_the_gpu() -> None:
    alloc = GpuAllocator(["0"])
    alloc.allocate("echo/1", "e1")
    assert alloc.release("e1") == "0"
    assert alloc.gpu_of("e1") is None
    assert alloc.release("e1") is None  # twice: ignored
    assert alloc.release("never-seen") is None
    assert alloc.allocate("digits/1", "d1") == "0"


def test_allocate_is_idempotent_per_replica() -> None:
    alloc = GpuAllocator(["0", "1"])
    assert alloc.allocate("echo/1", "e1") == "0"
    assert alloc.allocate("echo/1", "e1") == "0"
    assert alloc.eligible("echo/1") == ["1"]
    with pytest.raises(ValueError, match="already holds GPU 0"):
        alloc.allocate("digits/1", "e1")


def test_no_gpus_means_none() -> None:
    alloc = GpuAllocator([])
    assert alloc.allocate("echo/1", "e1") is None
    assert alloc.gpus == ()


def test_inventory_must_be_unique() -> None:
    with pytest.raises(ValueError, match="more than once"):
        GpuAllocator(["0", "0"])


def test_replicas_on_an_unknown_gpu() -> None:
    with pytest.raises(KeyError, match="unknown GPU"):
        GpuAllocator(["0"]).replicas_on("7")


# A random sequence of operations: allocate (model index, replica index) or release (replica index).
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(0, 3), st.integers(0, 11)),
        st.tuples(st.just("release"), st.just(0), st.integers(0, 11)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(n_gpus=st.integers(0, 4), allow_sharing=st.booleans(), ops=_ops)
def test_random_sequences_keep_the_placement_rules(n_gpus: int, allow_sharing: bool,
                                                   ops: list[tuple[str, int, int]]) -> None:
    inventory = [str(i) for i in range(n_gpus)]
    alloc = GpuAllocator(inventory, allow_sharing=allow_sharing)
    held: dict[str, tuple[str, str]] = {}  # replica -> (model, gpu): the model of what we asked
    for op, model_index, replica_index in ops:
        replica = f"r{replica_index}"
        model = f"m{model_index}/1"
        if op == "allocate":
            if replica in held and held[replica][0] != model:
                with pytest.raises(ValueError):
                    alloc.allocate(model, replica)
                continue
            could_fit = alloc.eligible(model)
            gpu = alloc.allocate(model, replica)
            if replica in held:
                assert gpu == held[replica][1]
            elif gpu is None:
                assert could_fit == []  # None only when nothing qualified
            else:
                assert gpu in could_fit
                held[replica] = (model, gpu)
        else:
            assert alloc.release(replica) == (held.pop(replica)[1] if replica in held else None)

        # The invariants, after every step.
        for gpu in inventory:
            occupants = alloc.replicas_on(gpu)
            models = [a.model_key for a in occupants]
            assert len(models) == len(set(models)), f"two replicas of one model on GPU {gpu}"
            if not allow_sharing:
                assert len(occupants) <= 1, f"models share GPU {gpu} without allow_sharing"
        assert {r: alloc.gpu_of(r) for r in held} == {r: g for r, (_, g) in held.items()}
