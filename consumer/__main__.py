"""``python -m consumer``: score customer events with the current model, one group member.

Signals are blocked here, before any import can start a thread (numpy's BLAS pool starts at
import), so that every thread inherits the mask and SIGTERM/SIGINT reach only the thread that
waits for them (``consumer.service.receive_signals``), even while the loop is inside a blocking
Kafka client call.
"""

import signal
import sys

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

from consumer.service import main  # noqa: E402 - after the signal mask, on purpose

sys.exit(main())
