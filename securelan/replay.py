# -*- test-case-name: tests.test_replay -*-
"""
The anti-replay window of the data plane (RFC 6479), after wireguard-go's
C{replay/replay.go}.

L{ReplayWindow} remembers which message counters of one receiving key it has
accepted.  It accepts a counter at most once, rejects a counter more than
L{WINDOW_SIZE} behind the highest one accepted so far, and rejects every
counter at or above L{REJECT_AFTER_MESSAGES}.

The window is a ring of L{RING_BLOCKS} 64-bit blocks: one bit per counter.
Moving forward clears whole blocks instead of shifting a bitmap, so a check
costs a handful of integer operations whatever the distance moved.  One
block is always the one being cleared for reuse, which is why the window
is C{(RING_BLOCKS - 1) * 64} counters wide rather than C{RING_BLOCKS * 64}.

Call L{ReplayWindow.check} only for a message whose authentication tag has
verified: a forged message must never move the window.
"""

__all__ = ["ReplayWindow", "REJECT_AFTER_MESSAGES", "WINDOW_SIZE"]

#: No key ever protects a message with this counter or a higher one
#: (WireGuard's C{RejectAfterMessages}).  Senders stop before it, receivers
#: reject it.
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1

_BLOCK_BIT_LOG = 6  # 2**6 = 64 bits per block
_BLOCK_BITS = 1 << _BLOCK_BIT_LOG
_BIT_MASK = _BLOCK_BITS - 1

#: Blocks in the ring (a power of two).
RING_BLOCKS = 1 << 7
_BLOCK_MASK = RING_BLOCKS - 1

#: How far behind the highest accepted counter a counter may be and still be
#: accepted (once): 8128 messages, as in WireGuard.
WINDOW_SIZE = (RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayWindow:
    """
    The set of counters accepted so far for one receiving key, as a sliding
    window.  A new window has accepted nothing.  Not safe for concurrent use
    (the data plane runs in the reactor thread).
    """

    __slots__ = ("_last", "_ring")

    def __init__(self):
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    def __repr__(self):
        return f"<ReplayWindow last={self._last}>"

    @property
    def last(self) -> int:
        """
        The highest counter accepted so far (0 when none was).
        """
        return self._last

    def reset(self):
        """
        Forget every counter accepted so far.
        """
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    def reject_through(self, counter: int):
        """
        Count every counter up to and including C{counter} as accepted: for
        a receiving key that is taken up again (the same key granted after a
        purge), so nothing it accepted before can be replayed.
        """
        full = (1 << _BLOCK_BITS) - 1
        self._ring = [full] * RING_BLOCKS
        self._ring[(counter >> _BLOCK_BIT_LOG) & _BLOCK_MASK] = (1 << ((counter & _BIT_MASK) + 1)) - 1
        self._last = counter

    def seen(self, counter: int) -> bool:
        """
        Whether L{check} would refuse C{counter} now, without changing
        anything.  Unlike L{check} this may be asked before the tag is
        verified (RFC 4303, section 3.4.3: a replay is dropped cheaply,
        and only an authentic message moves the window).
        """
        if counter >= REJECT_AFTER_MESSAGES:
            return True
        last = self._last
        if counter > last:
            return False
        if last - counter > WINDOW_SIZE:
            return True
        return bool(self._ring[(counter >> _BLOCK_BIT_LOG) & _BLOCK_MASK] & (1 << (counter & _BIT_MASK)))

    def check(self, counter: int) -> bool:
        """
        Whether a message with this counter may be accepted; if so, remember
        that it was.

        Call this only after the message's authentication tag has verified.

        @param counter: the message counter, an integer in M{[0, 2**64)}.
        @return: C{False} if C{counter} was accepted before, lies more than
            L{WINDOW_SIZE} behind the highest counter accepted, or is at or
            above L{REJECT_AFTER_MESSAGES}; else C{True}, and the window now
            holds C{counter}.
        """
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        ring = self._ring
        index_block = counter >> _BLOCK_BIT_LOG
        last = self._last
        if counter > last:
            # Move forward: clear every block after the old head's, up to
            # and including the new head's (at most the whole ring).
            current = last >> _BLOCK_BIT_LOG
            if index_block != current:
                if index_block - current >= RING_BLOCKS:
                    ring = self._ring = [0] * RING_BLOCKS
                else:
                    for i in range(current + 1, index_block + 1):
                        ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        index_block &= _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index_block]
        if old & bit:
            return False
        ring[index_block] = old | bit
        return True
