"""
The member agent: turns a host into a member of an encrypted subnet (the
seed's steps 2 and 4).

- L{dataplane}: the send and receive pipelines, frame by frame;
- L{peers}: the key cache (the seed's MAC-KEY list) and per-peer state;
- L{pending}: frames that wait for a key;
- L{device}: the TAP device; L{carriers}: how datagrams travel (udp,
  ethernet);
- L{roles}: what the agent does with frames (client now; gateway, border
  later), chosen by config;
- L{service} and L{tap}: the twistd service; L{status}: the local status
  socket that C{securelan status} reads.
"""
