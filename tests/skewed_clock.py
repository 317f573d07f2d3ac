"""kernel.py under torchrun with rank 1's clock running ahead (a torchrun child for
test_distributed.py): rank 1 finds a checkpoint due at every look, rank 0 never within a
run of a minute. Ranks that each decided by their own clock would enter different
collectives."""
import os
import sys
import time

if os.environ.get("RANK") == "1":
    _real, _calls = time.monotonic, [0]

    def _ahead() -> float:
        _calls[0] += 1
        return _real() + 3600.0 * _calls[0]  # an hour further at every look
    time.monotonic = _ahead

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel  # noqa: E402

sys.exit(kernel.cli())
