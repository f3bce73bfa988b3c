"""How long a push may take to be acknowledged, on both sides: a server pushing to the next one, and a
client delivering a step itself. A push is answered once the receiving server has queued the step (no
compute), so a round trip and the message's transfer are all it waits for. Past this, the link (or the
receiver) is taken as broken, and the one who pushed says so at once instead of waiting a step timeout.
"""

from __future__ import annotations

PUSH_ACK_BASE_S = 1.0  # a round trip with room for a loaded machine's scheduling
PUSH_ACK_BYTES_PER_S = 16 * 1024 * 1024  # the slowest link a push's message is expected to cross


def push_ack_timeout_s(message_bytes: int) -> float:
    """The deadline for acknowledging a push of ``message_bytes`` (a 20 MiB prefill: 2.25 s)."""
    return PUSH_ACK_BASE_S + message_bytes / PUSH_ACK_BYTES_PER_S
