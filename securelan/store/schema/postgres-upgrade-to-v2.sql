-- securelan key-server store on PostgreSQL: schema v1 to v2 (layer-3 mode:
-- members' overlay IP addresses).

-- The overlay IP addresses of members in layer-3 (TUN) mode: the seed's
-- ID-IP list for the layer-3 level, one member per address.
CREATE TABLE member_addresses
(
 address TEXT PRIMARY KEY, -- the ipaddress module's text form
 member_id TEXT COLLATE "C" NOT NULL REFERENCES members (member_id) ON DELETE CASCADE
);
CREATE INDEX member_addresses_member_id ON member_addresses (member_id);
