"""
Tests for L{securelan.agent.device}: the TAP and TUN devices, on a fake
operating system (L{securelan.testing.FakeDeviceSystem}).
"""

from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securelan.agent.carriers import UDPCarrier
from securelan.agent.device import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TapDevice, TunDevice
from securelan.agent.roles import super_frame_limit
from securelan.keys import SecretKey
from securelan.testing import FakeDeviceSystem
from securelan.wire import TYPE_PAIR, Sealer

MAC = b"\x02\0\0\0\0\x05"


class SuperFrameLimitTests(SynchronousTestCase):
    """
    The agent asks the kernel for super-frames whose datagrams fit one send
    of its carrier.
    """

    def test_udp_over_1500(self):
        """
        Over a 1500-byte IPv4 underlay a GSO send takes 44 datagrams of
        1,472 bytes, so super-frames stop at 63,346 bytes: 44 * 1,440
        bytes of ciphertext less the tag, with the virtio-net header in and
        the MACs (which travel in the headers) out.
        """
        carrier = UDPCarrier("127.0.0.1", 0, 1500, "", MemoryReactor())
        self.assertEqual((carrier.max_datagram, carrier.pieces_per_send), (1472, 44))
        self.assertEqual(super_frame_limit(carrier), 63346)
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        vnet = bytes([1, 4, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        for size, pieces in ((63346, 44), (63347, 45)):
            frame = MAC + MAC + b"\x08\x00" + bytes(size - 14)
            self.assertEqual(len(sealer.seal(frame, carrier.max_datagram, offload=vnet)), pieces)

    def test_no_gso(self):
        """
        A carrier that sends datagram by datagram sets no limit.
        """
        class OneByOne:
            max_datagram = 1500
            pieces_per_send = None

        self.assertIsNone(super_frame_limit(OneByOne()))


class TapDeviceTests(SynchronousTestCase):
    """
    L{TapDevice.start} configures the device; L{TapDevice.read_batch} and
    L{TapDevice.write} carry frames with their virtio-net headers.
    """

    def started(self, device_class=TapDevice, refuse=(), **kwargs):
        system = FakeDeviceSystem(refuse=refuse)
        if device_class is TapDevice:
            device = TapDevice("slan0", MAC, 1422, ["10.9.0.5/24"], reactor=MemoryReactor(), system=system,
                               **kwargs)
        else:
            device = device_class("slnet0", 1422, reactor=MemoryReactor(), system=system, **kwargs)
        received = []
        device.start(lambda frame, offload: received.append((bytes(frame), offload)))
        self.addCleanup(device.stop)
        return device, system, received

    def test_offloads_and_link(self):
        """
        The device is opened with virtio-net headers and TCP offloads, and
        gets its MAC, MTU, super-frame limit and address, then goes up.
        """
        _, system, _ = self.started(gso_max_size=63346)
        self.assertEqual(system.ioctls[1][1] & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
                         TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        self.assertEqual(system.ip_calls, [
            ["link", "set", "dev", "slan0", "address", "02:00:00:00:00:05", "mtu", "1422"],
            ["link", "set", "dev", "slan0", "gso_max_size", "63346"],
            ["addr", "add", "10.9.0.5/24", "dev", "slan0"],
            ["link", "set", "dev", "slan0", "up"],
        ])

    def test_no_limit_asked(self):
        """
        Without a limit the kernel's own (64 KiB) stands: no such command.
        """
        _, system, _ = self.started()
        self.assertNotIn("gso_max_size", [word for call in system.ip_calls for word in call])

    def test_limit_refused(self):
        """
        An ip (or kernel) that cannot set the limit costs a warning, not the
        device: it still comes up, and a TUN device likewise.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for device_class in (TapDevice, TunDevice):
            device, system, _ = self.started(device_class, refuse={"gso_max_size"}, gso_max_size=60000)
            self.assertIsNotNone(device.fd)
            self.assertEqual(system.ip_calls[-1][-1], "up")
        warnings = [e for e in events if "cannot limit super-frames" in e.get("log_format", "")]
        self.assertEqual([e["size"] for e in warnings], [60000, 60000])

    def test_frames_both_ways(self):
        """
        A frame read with a zero virtio-net header comes without it; one
        with a header (a super-frame) comes with it apart; written back,
        a frame gets a zero header, an offload frame keeps its own.
        """
        device, system, received = self.started()
        vnet = bytes([1, 4, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        system.to_read = [bytes(10) + b"plain frame", vnet + b"super frame"]
        device.read_batch()
        self.assertEqual(received, [(b"plain frame", None), (b"super frame", vnet)])
        self.assertTrue(device.write(b"to the host"))
        self.assertTrue(device.write(vnet + b"offload", offload=True))
        self.assertEqual(system.written, [bytes(10) + b"to the host", vnet + b"offload"])

    def test_flush_after_each_batch(self):
        """
        After each batch of reads (until the device has no more, or the
        batch limit) the receiver's C{flush} is called once, after the last
        frame: the frames of one batch may be sent together.
        """
        system = FakeDeviceSystem()
        device = TapDevice("slan0", MAC, 1422, reactor=MemoryReactor(), system=system)
        events = []
        device.start(lambda frame, offload: events.append(bytes(frame)), lambda: events.append("flush"))
        self.addCleanup(device.stop)
        system.to_read = [bytes(10) + b"frame %d" % i for i in range(TapDevice.BATCH + 2)]
        device.read_batch()
        self.assertEqual(events, [b"frame %d" % i for i in range(TapDevice.BATCH)] + ["flush"])
        del events[:]
        device.read_batch()
        device.read_batch()
        self.assertEqual(events, [b"frame 64", b"frame 65", "flush", "flush"])

    def test_receiver_fails(self):
        """
        A receiver that raises costs that frame only: it is counted and
        logged, the next frame is handed on, and the receiver still gets its
        C{flush} (nothing it held is left behind).
        """
        system = FakeDeviceSystem()
        device = TapDevice("slan0", MAC, 1422, reactor=MemoryReactor(), system=system)
        flushes, got = [], []

        def receiver(frame, offload):
            if not got:
                got.append(None)
                raise RuntimeError("a bug")
            got.append(bytes(frame))

        device.start(receiver, lambda: flushes.append(1))
        self.addCleanup(device.stop)
        system.to_read = [bytes(10) + b"frame 1", bytes(10) + b"frame 2"]
        device.read_batch()
        self.assertEqual((got[1:], device.read_failures, flushes), ([b"frame 2"], 1, [1]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


    def test_super_frames_are_views(self):
        """
        A frame read with a virtio-net header is handed on as a view of the
        read (not a copy), with the same bytes; a plain frame as bytes.
        """
        system = FakeDeviceSystem()
        device = TapDevice("slan0", MAC, 1422, reactor=MemoryReactor(), system=system)
        received = []
        device.start(lambda frame, offload: received.append((frame, offload)))
        self.addCleanup(device.stop)
        vnet = bytes([1, 4, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        system.to_read = [vnet + b"super frame", bytes(10) + b"plain frame"]
        device.read_batch()
        (big, big_offload), (small, small_offload) = received
        self.assertIsInstance(big, memoryview)
        self.assertEqual((bytes(big), big_offload), (b"super frame", vnet))
        self.assertEqual((small, small_offload), (b"plain frame", None))
