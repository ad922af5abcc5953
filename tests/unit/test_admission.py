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


def test_batch_fills_only_what_interactive_does_not_keep() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=4, interactive_slots=1,
                                                 interactive_kv_tokens=30))
    for i in range(5):
        adm.offer(f"b{i}", 10, Priority.BATCH, f"b{i}")
    assert adm.admit_ready() == ["b0", "b1", "b2"]  # the fourth slot is interactive's
    assert adm.wants(Priority.INTERACTIVE) and not adm.wants(Priority.BATCH)
    assert adm.room(Priority.INTERACTIVE) == 1 and adm.room(Priority.BATCH) == 0
    adm.offer("i", 50, Priority.INTERACTIVE, "i")
    assert adm.admit_ready() == ["i"]  # and the cache batch left it
    adm.release("b0")
    assert adm.admit_ready() == ["b3"]  # a batch slot freed: batch goes on beside the interactive request
    adm.release("i")
    assert adm.admit_ready() == []  # batch holds its 3 slots: the freed one stays interactive's


def test_batch_keeps_off_interactive_kv_share_but_a_big_one_runs_alone() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=8, interactive_slots=0,
                                                 interactive_kv_tokens=40))
    for name in ("b0", "b1"):
        adm.offer(name, 35, Priority.BATCH, name)
    assert adm.admit_ready() == ["b0"]  # b1 would take batch past its 60 tokens
    adm.offer("i", 40, Priority.INTERACTIVE, "i")
    assert adm.admit_ready() == ["i"]  # the cache batch left free
    for name in ("b0", "i"):
        adm.release(name)
    assert adm.admit_ready() == ["b1"]
    adm.release("b1")
    adm.offer("big", 90, Priority.BATCH, "big")  # more than batch's share, less than the cache: alone, it runs
    assert adm.admit_ready() == ["big"]


def test_a_big_batch_request_runs_once_no_batch_work_does_though_interactive_work_overlaps() -> None:
    adm: KvAdmission[str] = KvAdmission(Capacity(kv_tokens=100, max_running=4, interactive_slots=1,
                                                 interactive_kv_tokens=25))
    adm.offer("i0", 10, Priority.INTERACTIVE, "i0")
    assert adm.admit_ready() == ["i0"]
    adm.offer("big", 80, Priority.BATCH, "big")  # more than batch's 75 tokens
    adm.offer("b1", 5, Priority.BATCH, "b1")
    assert adm.admit_ready() == ["big"]  # no batch work runs: it goes, beside the interactive request
    adm.offer("i1", 10, Priority.INTERACTIVE, "i1")
    assert adm.admit_ready() == ["i1"] and not adm.wants(Priority.BATCH)  # b1 waits for batch room
