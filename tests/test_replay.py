"""
Tests for L{securelan.replay}.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securelan.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayWindow

# wireguard-go's replay_test.go (ported there from the Linux kernel's
# selftest): T_LIM is one past the window.
T_LIM = WINDOW_SIZE + 1
R = REJECT_AFTER_MESSAGES

# The 34 numbered cases of that test, in order, on one window.
SELFTEST = [
    (0, True),  # 1
    (1, True),  # 2
    (1, False),  # 3
    (9, True),  # 4
    (8, True),  # 5
    (7, True),  # 6
    (7, False),  # 7
    (T_LIM, True),  # 8
    (T_LIM - 1, True),  # 9
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),  # 11
    (2, True),  # 12
    (2, False),  # 13
    (T_LIM + 16, True),  # 14
    (3, False),  # 15
    (T_LIM + 16, False),  # 16
    (T_LIM * 4, True),  # 17
    (T_LIM * 4 - (T_LIM - 1), True),  # 18
    (10, False),  # 19
    (T_LIM * 4 - T_LIM, False),  # 20
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True),  # 22
    (T_LIM * 4 + 1 - T_LIM, False),  # 23
    (0, False),  # 24
    (R, False),  # 25
    (R - 1, True),  # 26
    (R, False),  # 27
    (R - 1, False),  # 28
    (R - 2, True),  # 29
    (R + 1, False),  # 30
    (R + 2, False),  # 31
    (R - 2, False),  # 32
    (R - 3, True),  # 33
    (0, False),  # 34
]


class Reference:
    """
    The replay window's specification, spelled out with a set: a counter is
    accepted once, if it is below the limit and no more than WINDOW_SIZE
    behind the highest counter accepted (0 before any).
    """

    def __init__(self):
        self.accepted = set()
        self.highest = 0

    def check(self, counter):
        if counter >= REJECT_AFTER_MESSAGES or counter in self.accepted:
            return False
        if self.highest - counter > WINDOW_SIZE:
            return False
        self.accepted.add(counter)
        self.highest = max(self.highest, counter)
        return True


class ReplayWindowTests(SynchronousTestCase):
    """
    L{ReplayWindow} is WireGuard's RFC 6479 window.
    """

    def assertSequence(self, window, cases):
        """
        Feed C{(counter, expected)} pairs to C{window}, failing at the first
        unexpected answer with its 1-based case number.
        """
        for number, (counter, expected) in enumerate(cases, 1):
            self.assertEqual(
                window.check(counter), expected, f"case {number}: counter {counter}"
            )

    def test_windowSize(self):
        """
        The window spans 8192 - 64 counters, as WireGuard's does.
        """
        self.assertEqual(WINDOW_SIZE, 8128)
        self.assertEqual(REJECT_AFTER_MESSAGES, 2**64 - 2**13 - 1)

    def test_selftest(self):
        """
        The 34 numbered cases of wireguard-go's and the kernel's replay
        selftest give the same answers.
        """
        self.assertSequence(ReplayWindow(), SELFTEST)

    def test_bulkForwardFromOne(self):
        """
        Bulk test 1: 1 to WINDOW_SIZE are all accepted; then 0 is still in
        the window, once.
        """
        cases = [(i, True) for i in range(1, WINDOW_SIZE + 1)]
        self.assertSequence(ReplayWindow(), cases + [(0, True), (0, False)])

    def test_bulkForwardFromTwo(self):
        """
        Bulk test 2: 2 to WINDOW_SIZE + 1 are accepted; 1 is the oldest in
        the window, 0 has fallen out.
        """
        cases = [(i, True) for i in range(2, WINDOW_SIZE + 2)]
        self.assertSequence(ReplayWindow(), cases + [(1, True), (0, False)])

    def test_bulkBackward(self):
        """
        Bulk test 3: WINDOW_SIZE + 1 down to 1 are all accepted.
        """
        cases = [(i, True) for i in range(WINDOW_SIZE + 1, 0, -1)]
        self.assertSequence(ReplayWindow(), cases)

    def test_bulkBackwardPastTheWindow(self):
        """
        Bulk test 4: WINDOW_SIZE + 2 down to 2 are accepted; 0 is then one
        behind the window.
        """
        cases = [(i, True) for i in range(WINDOW_SIZE + 2, 1, -1)]
        self.assertSequence(ReplayWindow(), cases + [(0, False)])

    def test_bulkBackwardThenForward(self):
        """
        Bulk test 5: WINDOW_SIZE down to 1, then WINDOW_SIZE + 1 moves the
        window so 0 falls out.
        """
        cases = [(i, True) for i in range(WINDOW_SIZE, 0, -1)]
        self.assertSequence(
            ReplayWindow(), cases + [(WINDOW_SIZE + 1, True), (0, False)]
        )

    def test_bulkBackwardToZeroThenForward(self):
        """
        Bulk test 6: WINDOW_SIZE down to 0, then WINDOW_SIZE + 1.
        """
        cases = [(i, True) for i in range(WINDOW_SIZE, 0, -1)]
        self.assertSequence(
            ReplayWindow(), cases + [(0, True), (WINDOW_SIZE + 1, True)]
        )

    def test_fullWindowSweepsRejectEverySecondTime(self):
        """
        After a whole window is filled, forward or backward, every counter in
        it is a duplicate.
        """
        for order in (range(WINDOW_SIZE + 1), range(WINDOW_SIZE, -1, -1)):
            window = ReplayWindow()
            self.assertSequence(window, [(i, True) for i in order])
            self.assertSequence(window, [(i, False) for i in order])

    def test_jumpBeyondTheWindow(self):
        """
        A jump of more than the window forgets everything behind it: old
        counters are rejected as too old, fresh ones near the new head are
        accepted, and nothing from before the jump lingers in the ring.
        """
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(200)])
        head = 10 * WINDOW_SIZE + 77
        self.assertTrue(window.check(head))
        self.assertEqual(window.last, head)
        self.assertFalse(window.check(199))
        self.assertFalse(window.check(head - WINDOW_SIZE - 1))
        # Every counter of the new window is fresh, including those whose
        # ring bits were set before the jump.
        self.assertSequence(window, [(head - i, True) for i in range(1, WINDOW_SIZE + 1)])
        self.assertFalse(window.check(head))

    def test_ringSlotReused(self):
        """
        Moving forward in steps shorter than the ring onto a block whose
        ring slot once held an accepted counter clears that slot: the new
        counter with the same low bits is fresh.
        """
        for stop in (100, 127):
            window = ReplayWindow()
            self.assertTrue(window.check(5))
            self.assertTrue(window.check(stop * 64))
            self.assertTrue(window.check(128 * 64 + 5))
            self.assertFalse(window.check(128 * 64 + 5))
            self.assertTrue(window.check(128 * 64 + 6))

    def test_jumpKeepsTheOldestBlock(self):
        """
        A jump of 127 blocks keeps the block the window still reaches into:
        its accepted counters stay duplicates.
        """
        window = ReplayWindow()
        self.assertSequence(window, [(62, True), (63, True)])
        self.assertTrue(window.check(127 * 64 + 1))
        self.assertSequence(window, [(63, False), (62, False), (61, True), (0, False)])

    def test_jumpByExactlyTheRing(self):
        """
        A jump by exactly the ring's span (128 blocks) clears every block.
        """
        window = ReplayWindow()
        self.assertTrue(window.check(5))
        self.assertTrue(window.check(5 + 128 * 64))
        self.assertTrue(window.check(5 + 128 * 64 - 64))
        self.assertFalse(window.check(5))

    def test_rejectAfterMessages(self):
        """
        Counters at and above REJECT_AFTER_MESSAGES are rejected, up to the
        largest 64-bit counter, and do not move the window.
        """
        window = ReplayWindow()
        self.assertTrue(window.check(7))
        for counter in (R, R + 1, 2**64 - 1):
            self.assertFalse(window.check(counter))
        self.assertEqual(window.last, 7)
        self.assertTrue(window.check(R - 1))
        self.assertEqual(window.last, R - 1)

    def test_reset(self):
        """
        A reset window accepts again what it had accepted.
        """
        window = ReplayWindow()
        self.assertSequence(window, [(0, True), (50000, True)])
        window.reset()
        self.assertSequence(window, [(0, True), (50000, True), (0, False)])

    def test_repr(self):
        """
        The repr names the highest counter.
        """
        window = ReplayWindow()
        window.check(42)
        self.assertEqual(repr(window), "<ReplayWindow last=42>")

    @settings(deadline=None, derandomize=True, max_examples=300)
    @given(
        st.lists(
            st.one_of(
                # Near the head: duplicates, reordering, small steps.
                st.tuples(st.just("rel"), st.integers(-40, 40)),
                # Around the trailing edge of the window.
                st.tuples(st.just("rel"), st.integers(-WINDOW_SIZE - 70, -WINDOW_SIZE + 70)),
                # Forward jumps up to beyond the ring.
                st.tuples(st.just("rel"), st.integers(0, 3 * WINDOW_SIZE)),
                # Jumps by whole blocks, so a counter lands on a ring bit
                # that an older counter once set.
                st.tuples(
                    st.just("rel"),
                    st.builds(
                        lambda blocks, skew: 64 * blocks + skew,
                        st.integers(1, 130),
                        st.integers(-2, 2),
                    ),
                ),
                # A run of consecutive counters: fills whole ring blocks.
                st.tuples(st.just("run"), st.integers(1, 200)),
                # Anywhere, including near and past the limit.
                st.tuples(
                    st.just("abs"),
                    st.one_of(
                        st.integers(0, 2**64 - 1),
                        st.integers(R - 3 * WINDOW_SIZE, R + 3),
                    ),
                ),
            ),
            max_size=400,
        )
    )
    def test_matchesReference(self, steps):
        """
        On any sequence of counters the window answers exactly as the
        set-based specification: it never accepts a duplicate, never one
        too old or past the limit, and accepts every fresh counter in the
        window; L{ReplayWindow.seen} foretells each answer without
        changing the window.
        """
        window, reference = ReplayWindow(), Reference()
        for kind, value in steps:
            if kind == "abs":
                counters = [value]
            elif kind == "run":
                counters = range(reference.highest + 1, reference.highest + 1 + value)
            else:
                counters = [max(0, reference.highest + value)]
            for counter in counters:
                counter = min(counter, 2**64 - 1)
                # seen() tells beforehand what check() will say, and
                # changes nothing (asked twice, the answer stands).
                seen = window.seen(counter)
                self.assertEqual(window.seen(counter), seen)
                accepted = window.check(counter)
                self.assertEqual(accepted, reference.check(counter), counter)
                self.assertEqual(seen, not accepted, counter)
                self.assertEqual(window.last, reference.highest)


class RejectThroughTests(SynchronousTestCase):
    """
    L{ReplayWindow.reject_through}: a window taken up again refuses what the
    key accepted before.
    """

    @settings(deadline=None, derandomize=True)
    @given(st.integers(0, 2**40), st.integers(1, 200))
    def test_refuses_old_accepts_new(self, last, ahead):
        """
        Every counter up to C{last} (within the window) is refused; the next
        ones are accepted once.
        """
        window = ReplayWindow()
        window.reject_through(last)
        for counter in range(max(0, last - 200), last + 1):
            self.assertFalse(window.check(counter))
        for counter in range(last + 1, last + 1 + ahead):
            self.assertTrue(window.check(counter))
            self.assertFalse(window.check(counter))
