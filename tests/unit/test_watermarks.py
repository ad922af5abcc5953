from aiokafka import TopicPartition

from inferlog_worker.watermarks import PartitionWatermarks

TP = TopicPartition("t", 0)


def test_commits_only_up_to_lowest_unfinished() -> None:
    marks = PartitionWatermarks()
    for offset in range(10):
        marks.track(TP, offset)
    assert marks.committable(TP) == 0
    for offset in (3, 1, 2, 9):
        marks.finish(TP, offset)
        assert marks.committable(TP) == 0
    marks.finish(TP, 0)
    assert marks.committable(TP) == 4
    for offset in (4, 5, 6, 7, 8):
        marks.finish(TP, offset)
    assert marks.committable(TP) == 10


def test_due_reports_only_advances() -> None:
    marks = PartitionWatermarks()
    marks.track(TP, 5)
    assert marks.due() == {TP: 5}
    marks.committed(TP, 5)
    assert marks.due() == {}
    marks.finish(TP, 5)
    assert marks.due() == {TP: 6}


def test_refetched_offsets_keep_their_state() -> None:
    marks = PartitionWatermarks()
    marks.track(TP, 0)
    marks.track(TP, 1)
    marks.finish(TP, 0)
    marks.track(TP, 0)  # re-fetched after a seek: still finished
    assert marks.committable(TP) == 1


def test_forget_drops_revoked_partitions() -> None:
    marks = PartitionWatermarks()
    marks.track(TP, 0)
    marks.forget({TP})
    assert marks.committable(TP) is None
    assert not marks.owns(TP)
    marks.finish(TP, 0)  # a late finish for a revoked partition is harmless
    assert marks.due() == {}
