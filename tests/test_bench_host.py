"""The benchmarks' reading of the machine's CPU time (bench.HostCpu): busy, idle and stolen shares
of a timed window, which the latency figures are reported beside; and of a process's and a
thread's CPU time (bench.process_cpu_s), which the loop's cost per event is made of."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench import HostCpu, host_figures, host_shares, process_cpu_s

STAT = """cpu  100 5 30 800 20 3 2 40 7 0
cpu0 50 2 15 400 10 1 1 20 3 0
intr 12345
"""


def test_parse_sums_busy_idle_and_steal_from_the_aggregate_line():
    h = HostCpu.parse(STAT)
    # busy: user + nice + system + irq + softirq (guest is inside user); idle: idle + iowait
    assert h == HostCpu(busy=100 + 5 + 30 + 3 + 2, idle=800 + 20, steal=40)


def test_parse_a_kernel_without_the_steal_column():
    assert HostCpu.parse("cpu  1 2 3 4 5\n") == HostCpu(busy=6, idle=9, steal=0)


def test_parse_refuses_what_is_not_proc_stat():
    with pytest.raises(ValueError):
        HostCpu.parse("intr 1 2 3\ncpu 1 2 3 4\n")
    with pytest.raises(ValueError):
        HostCpu.parse("")


def test_read_is_none_without_the_file(tmp_path):
    assert HostCpu.read(str(tmp_path / "no-such-stat")) is None
    (tmp_path / "stat").write_text(STAT)
    assert HostCpu.read(str(tmp_path / "stat")) == HostCpu.parse(STAT)


def test_shares_of_a_window():
    a = HostCpu(busy=1000, idle=5000, steal=100)
    b = HostCpu(busy=1600, idle=5300, steal=200)  # +600 busy, +300 idle, +100 stolen
    busy, steal = host_shares(a, b)
    assert busy == pytest.approx(0.6)
    assert steal == pytest.approx(0.1)
    figures = {f.name: f.value for f in host_figures("x", host_shares(a, b), ".k")}
    assert figures == {"x_host_busy.k": pytest.approx(60.0), "x_host_steal.k": pytest.approx(10.0)}


def test_no_shares_without_both_readings_or_without_time():
    a = HostCpu(busy=1, idle=2, steal=3)
    assert host_shares(None, a) is None
    assert host_shares(a, None) is None
    assert host_shares(a, a) is None
    assert list(host_figures("x", host_shares(None, a))) == []


def test_process_cpu_counts_this_process_and_its_main_thread():
    pid = os.getpid()
    main = process_cpu_s(pid, pid)  # the thread first: a tick between the reads only widens the gap
    whole = process_cpu_s(pid)
    assert whole is not None and main is not None and whole >= main

    def spin() -> None:  # CPU on another thread: the process's count grows, the main thread's not by it
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    t = threading.Thread(target=spin)
    t.start()
    t.join()
    assert process_cpu_s(pid) - whole >= 0.2
    assert process_cpu_s(pid, pid) - main < 0.2


def test_process_cpu_of_no_process_is_none():
    assert process_cpu_s(2**22 + 12345) is None  # above the kernel's pid_max
    assert process_cpu_s(1, 2**22 + 12345) is None
