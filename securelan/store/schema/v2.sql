-- securelan key-server store, schema version 2 (the latest): builds a new
-- database from nothing.  An older database is brought here by the
-- upgrade-to-vN.sql files instead.
--
-- Every key column holds a key wrapped under the master key
-- (securelan.keys.MasterKey.wrap), with associated data that names the row,
-- so a wrapped key copied to another row does not open.

CREATE TABLE version
(
 version INTEGER NOT NULL -- exactly one row
);

-- "master_key_check": a random key wrapped under the master key, to tell at
-- open whether the master key file belongs to this database.
-- "created_at": when the database was made (seconds since the epoch).
CREATE TABLE meta
(
 name TEXT PRIMARY KEY,
 value BLOB NOT NULL
);

-- The member registry (the seed's ID-MAC list).
CREATE TABLE members
(
 member_id TEXT PRIMARY KEY,
 role TEXT NOT NULL,
 mac TEXT NOT NULL UNIQUE, -- lower-case colon form, aa:bb:cc:dd:ee:ff
 endpoint TEXT NOT NULL DEFAULT '', -- host:port of the underlay, or ''
 registered_at REAL NOT NULL,
 last_seen REAL,
 -- Raised by one at every registration: the member's agents put it in the
 -- keys they derive, so a restarted agent never reuses a nonce.
 incarnation INTEGER NOT NULL DEFAULT 0
);

-- The overlay IP addresses of members in layer-3 (TUN) mode: the seed's
-- ID-IP list for the layer-3 level, one member per address.
CREATE TABLE member_addresses
(
 address TEXT PRIMARY KEY, -- the ipaddress module's text form
 member_id TEXT NOT NULL REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX member_addresses_member_id ON member_addresses (member_id);

-- The pair-key table (the seed's ID-ID-KEY list): one current key for each
-- unordered pair, stored in canonical order.
CREATE TABLE pair_keys
(
 id_a TEXT NOT NULL,
 id_b TEXT NOT NULL,
 epoch INTEGER NOT NULL, -- the seed's PW_ID
 wrapped_key BLOB NOT NULL,
 created_at REAL NOT NULL,
 expires_at REAL NOT NULL DEFAULT 0, -- 0: never
 PRIMARY KEY (id_a, id_b),
 CHECK (id_a <= id_b)
);
-- Every key of one member (revocation) is found through either column.
CREATE INDEX pair_keys_id_b ON pair_keys (id_b);

-- The group key (the seed's ID_M, KEY_M), one current key per group.
CREATE TABLE group_keys
(
 group_id TEXT PRIMARY KEY,
 epoch INTEGER NOT NULL,
 wrapped_key BLOB NOT NULL,
 created_at REAL NOT NULL
);

-- MACs on a plaintext network that a gateway (the seed's ID_X86) fronts: the
-- seed's ID-IP list.  A gateway that leaves the registry takes them along.
CREATE TABLE foreign_macs
(
 mac TEXT PRIMARY KEY, -- lower-case colon form
 gateway_id TEXT NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
 learned_at REAL NOT NULL,
 expires_at REAL NOT NULL DEFAULT 0 -- 0: never
);
CREATE INDEX foreign_macs_gateway_id ON foreign_macs (gateway_id);

-- Inter-subnet keys (the seed's NETKEY), one per pair of subnets.
CREATE TABLE net_keys
(
 local_subnet TEXT NOT NULL,
 peer_subnet TEXT NOT NULL,
 epoch INTEGER NOT NULL,
 wrapped_key BLOB NOT NULL,
 created_at REAL NOT NULL,
 PRIMARY KEY (local_subnet, peer_subnet)
);

-- Revoked members and certificates.  serial '' revokes every certificate of
-- the member.
CREATE TABLE revoked
(
 member_id TEXT NOT NULL,
 serial TEXT NOT NULL DEFAULT '',
 revoked_at REAL NOT NULL,
 reason TEXT NOT NULL DEFAULT '',
 PRIMARY KEY (member_id, serial)
);
