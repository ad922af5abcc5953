from inferlog.messages import Priority
from inferlog_worker.admission import Capacity, KvAdmission


def test_admits_while_kv_and_count_allow() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=3))
    for i in range(4):
        adm.offer(f"r{i}", 30, Priority.INTERACTIVE, f"r{i}")
    assert adm.admit_ready() == ["r0", "r1", "r2"]
    assert adm.tokens_in_flight == 90 and adm.waiting == 1 and not adm.has_room()
    adm.release("r0")
    assert adm.admit_ready() == ["r3"]


def test_kv_budget_blocks_large_request_without_overtaking() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=10))
    adm.offer("big", 80, Priority.INTERACTIVE, "big")
    adm.offer("huge", 90, Priority.INTERACTIVE, "huge")
    adm.offer("small", 5, Priority.INTERACTIVE, "small")
    assert adm.admit_ready() == ["big"]
    assert adm.admit_ready() == []  # "small" does not jump "huge": FIFO within a tier
    adm.release("big")
    assert adm.admit_ready() == ["huge", "small"]


def test_interactive_before_batch() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=1))
    adm.offer("b", 10, Priority.BATCH, "b")
    adm.offer("i", 10, Priority.INTERACTIVE, "i")
    assert adm.admit_ready() == ["i"]
    adm.release("i")
    assert adm.admit_ready() == ["b"]


def test_fits_ever_and_discard() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=1))
    assert adm.fits_ever(100) and not adm.fits_ever(101)
    adm.offer("a", 10, Priority.BATCH, "a")
    assert adm.discard_waiting("a") and not adm.discard_waiting("a")
    assert adm.waiting == 0
