"""utils.atomic: the one writer of every output and cache."""
import threading

import pytest

from utils.atomic import atomic_write


def test_writers_of_the_same_file_at_once_never_mix(tmp_path):
    # Two runs on the same data write the same header cache; with one shared temporary
    # name one run renames the other's half-written file, or finds its own gone.
    path, errors = tmp_path / "cache.bin", []

    def writer(k: int):
        try:
            for _ in range(30):
                atomic_write(path, lambda tmp: tmp.write_bytes(bytes([k]) * 200_000))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = path.read_bytes()
    assert len(data) == 200_000 and len(set(data)) == 1  # one writer's whole content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [path]
    atomic_write(path, lambda tmp: tmp.write_text("new\n"))
    assert path.read_text() == "new\n" and sorted(tmp_path.iterdir()) == [path]
