"""The process-wide kernel setting shared by the CPU linear and attention kernels
(anomalyclip.kernel_choice): environment, validation, and one measurement per key and thread count,
also when threads ask at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from anomalyclip.errors import InvalidInputError
from anomalyclip.kernel_choice import KernelChoice


def test_environment_then_code_decides_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_TEST_KERNEL", " FAST ")
    setting = KernelChoice("test", "ANOMALYCLIP_TEST_KERNEL", ("auto", "fast", "slow"))
    assert setting.get() == "fast"
    assert setting.set("slow") == "fast" and setting.get() == "slow"
    with pytest.raises(InvalidInputError, match="auto, fast, slow"):
        setting.set("quick")
    monkeypatch.setenv("ANOMALYCLIP_TEST_KERNEL", "quick")
    assert KernelChoice("test", "ANOMALYCLIP_TEST_KERNEL", ("auto", "fast")).get() == "auto"  # warned, ignored


def test_one_measurement_per_key_even_when_threads_ask_at_once():
    setting = KernelChoice("test", "ANOMALYCLIP_TEST_KERNEL", ("auto",))
    calls = []

    def measure() -> bool:
        calls.append(threading.get_ident())
        time.sleep(0.05)  # long enough for the other threads to arrive meanwhile
        return True

    results = []
    workers = [threading.Thread(target=lambda: results.append(setting.choose("shape", measure))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results == [True] * 4 and len(calls) == 1
    assert setting.choose("shape", lambda: False) is True  # kept
    assert list(setting.choices) == [("shape", torch.get_num_threads())]
    setting.clear()
    assert setting.choose("shape", lambda: False) is False
