-- securelan key-server store on PostgreSQL, schema version 2 (the latest):
-- builds a new database from nothing, in one transaction with the version
-- row and the master key check value.  The same tables and columns as the
-- SQLite schema v2.sql, in PostgreSQL types.  An older database is brought
-- here by the postgres-upgrade-to-vN.sql files instead.
--
-- Every key column holds a key wrapped under the master key
-- (securelan.keys.MasterKey.wrap), with associated data that names the row,
-- so a wrapped key copied to another row does not open.
--
-- Member IDs are compared in the "C" collation (code point order), the order
-- securelan.addresses.pair_of uses, whatever the database's own collation.

CREATE TABLE version
(
 version INTEGER NOT NULL -- exactly one row
);

-- "master_key_check": a random key wrapped under the master key, to tell at
-- open whether the master key file belongs to this database.
-- "created_at": when the database was made (seconds since the epoch, as text).
CREATE TABLE meta
(
 name TEXT PRIMARY KEY,
 value BYTEA NOT NULL
);

-- The member registry (the seed's ID-MAC list).
CREATE TABLE members
(
 member_id TEXT COLLATE "C" PRIMARY KEY,
 role TEXT NOT NULL,
 mac TEXT NOT NULL UNIQUE, -- lower-case colon form, aa:bb:cc:dd:ee:ff
 endpoint TEXT NOT NULL DEFAULT '', -- host:port of the underlay, or ''
 registered_at DOUBLE PRECISION NOT NULL,
 last_seen DOUBLE PRECISION,
 -- Raised by one at every registration: the member's agents put it in the
 -- keys they derive, so a restarted agent never reuses a nonce.
 incarnation BIGINT NOT NULL DEFAULT 0
);

-- The overlay IP addresses of members in layer-3 (TUN) mode: the seed's
-- ID-IP list for the layer-3 level, one member per address.
CREATE TABLE member_addresses
(
 address TEXT PRIMARY KEY, -- the ipaddress module's text form
 member_id TEXT COLLATE "C" NOT NULL REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX member_addresses_member_id ON member_addresses (member_id);

-- The pair-key table (the seed's ID-ID-KEY list): one current key for each
-- unordered pair, stored in canonical order.
CREATE TABLE pair_keys
(
 id_a TEXT COLLATE "C" NOT NULL,
 id_b TEXT COLLATE "C" NOT NULL,
 epoch BIGINT NOT NULL, -- the seed's PW_ID
 wrapped_key BYTEA NOT NULL,
 created_at DOUBLE PRECISION NOT NULL,
 expires_at DOUBLE PRECISION NOT NULL DEFAULT 0, -- 0: never
 PRIMARY KEY (id_a, id_b),
 CHECK (id_a <= id_b)
);
-- Every key of one member (revocation) is found through either column.
CREATE INDEX pair_keys_id_b ON pair_keys (id_b);

-- The group key (the seed's ID_M, KEY_M), one current key per group.
CREATE TABLE group_keys
(
 group_id TEXT COLLATE "C" PRIMARY KEY,
 epoch BIGINT NOT NULL,
 wrapped_key BYTEA NOT NULL,
 created_at DOUBLE PRECISION NOT NULL
);

-- MACs on a plaintext network that a gateway (the seed's ID_X86) fronts: the
-- seed's ID-IP list.  A gateway that leaves the registry takes them along.
CREATE TABLE foreign_macs
(
 mac TEXT PRIMARY KEY, -- lower-case colon form
 gateway_id TEXT COLLATE "C" NOT NULL REFERENCES members (member_id) ON DELETE CASCADE,
 learned_at DOUBLE PRECISION NOT NULL,
 expires_at DOUBLE PRECISION NOT NULL DEFAULT 0 -- 0: never
);
CREATE INDEX foreign_macs_gateway_id ON foreign_macs (gateway_id);

-- Inter-subnet keys (the seed's NETKEY), one per pair of subnets.
CREATE TABLE net_keys
(
 local_subnet TEXT COLLATE "C" NOT NULL,
 peer_subnet TEXT COLLATE "C" NOT NULL,
 epoch BIGINT NOT NULL,
 wrapped_key BYTEA NOT NULL,
 created_at DOUBLE PRECISION NOT NULL,
 PRIMARY KEY (local_subnet, peer_subnet)
);

-- Revoked members and certificates.  serial '' revokes every certificate of
-- the member.
CREATE TABLE revoked
(
 member_id TEXT COLLATE "C" NOT NULL,
 serial TEXT NOT NULL DEFAULT '',
 revoked_at DOUBLE PRECISION NOT NULL,
 reason TEXT NOT NULL DEFAULT '',
 PRIMARY KEY (member_id, serial)
);
