"""Server-side Lua scripts: each runs atomically on the one node owning a shard.

Every key a script touches shares the shard's hash tag, so on a Redis Cluster
the whole script runs on one node; KEYS[1] (the shard's signature hash) routes
it. A bucket key is ``<base><band byte><band value bytes>``, and a band's value
is a byte slice of the signature, so scripts derive bucket keys from stored
signatures and never need the vector or a keyspace scan.

A client always sends an id as its 8 little-endian bytes (Lua numbers are
doubles and would round ids past 2**53); an index of 4-byte ids stores its
low 4 bytes, as bucket entry and as record field (``stored`` in
``_RECORD_KEY``). Its record lives in the shard's record hash (KEYS[1])
or, in a grouped layout, in one of ``groups`` small hashes named after it
(``_RECORD_KEY``), which Redis keeps as compact listpacks. A bucket is a
string of such ids: a query MGETs a thousand buckets in one call and the
client reads the reply with ``numpy.frombuffer``. Measured on 32 x 14 at 100k, 1,000 buckets a query:
3.2 ms against 6.1 ms for sets read with SMEMBERS, whose members the server
turns into Lua strings one by one.

A Redis over ``maxmemory`` refuses a script without flags at its first
write command, before it has written anything (Redis 7's compatibility
mode), so a batch refused for memory leaves nothing half-written.
"""

# Where an id's record lives, and how many ids the shard holds. ``groups`` 0:
# one hash per shard (KEYS[1]), whose length is the count. Otherwise the
# record is in ``KEYS[1]:<group>``, a hash of about 32 records, and KEYS[4]
# counts the shard's ids. A hash-table field costs about 56 bytes of Redis
# overhead; a listpack entry about 4 (hash-max-listpack-entries, 128 by
# default, bounds a group; a larger one still works, as a hash table). The
# group mixes all 8 bytes of the id (multiplications by odd constants modulo
# 2**24, exact in doubles), so sequential and strided ids spread evenly;
# ``_index.group_of`` computes the same.
_RECORD_KEY = """
local groups = 0
-- idw: bytes an id is stored in (4 or 8). stored() is what a bucket or a
-- record field holds of an 8-byte id; full() the 8 bytes of a stored one
-- (4-byte ids are never negative, so their high bytes are zero).
local idw = 8
local function stored(id)
  if idw == 8 then return id end
  return string.sub(id, 1, idw)
end
local function full(sid)
  if idw == 8 then return sid end
  return sid .. string.char(0, 0, 0, 0)
end
local function record_key(id)
  if groups == 0 then return KEYS[1] end
  local b1, b2, b3, b4, b5, b6, b7, b8 = string.byte(id, 1, 8)
  local h = b1 + 256 * b2 + 65536 * b3
  h = (h * 40503 + b4 + 256 * b5 + 65536 * b6) % 16777216
  h = (h * 40503 + b7 + 256 * b8) % 16777216
  h = (h * 10368889) % 16777216
  return KEYS[1] .. ':' .. math.floor(h * groups / 16777216)
end
local function size()
  if groups == 0 then return redis.call('HLEN', KEYS[1]) end
  return tonumber(redis.call('GET', KEYS[4]) or '0')
end
local function counted(change)
  if groups > 0 and change ~= 0 then redis.call('INCRBY', KEYS[4], change) end
end
"""

# Removes one stored id from a bucket string; an emptied bucket is deleted.
_REMOVE = """
local function remove(key, sid)
  local ids = redis.call('GET', key)
  if not ids then return end
  for at = 1, #ids, idw do
    if string.sub(ids, at, at + idw - 1) == sid then
      if #ids == idw then redis.call('DEL', key)
      else redis.call('SET', key, string.sub(ids, 1, at - 1) .. string.sub(ids, at + idw)) end
      return
    end
  end
end
"""

# The change log: ids whose signature was written (inserted or replaced), the
# last CHANGE_LOG of them, oldest first; the generation counts every entry ever
# logged. A client that knows generation K and sees G evicts the last G - K
# entries from its signature cache, or drops the shard if the log is shorter.
# Entries are ids of 8 bytes, as sent. A delete needs no entry (a deleted id is in no bucket, so its cached
# signature is never looked up; a later insert logs it again) and leaves no
# trace: its entries become TOMBSTONE, so positions, and so the arithmetic, hold.
CHANGE_LOG = 4096
TOMBSTONE = "\\0\\0\\0\\0\\0\\0\\0\\128"  # id -2**63, evicted harmlessly

# Appends the ids a script (re)wrote to the shard's change log (KEYS[3]),
# keeps its last CHANGE_LOG entries, and advances the generation (KEYS[2]):
# every writer of signatures logs the same way, or readers' caches go stale.
_LOG_CHANGES = """
local function log_changes(logged)
  if #logged > 0 then
    redis.call('RPUSH', KEYS[3], unpack(logged))
    redis.call('LTRIM', KEYS[3], -CHANGE_LOG, -1)
    redis.call('INCRBY', KEYS[2], #logged)
  end
end
""".replace("CHANGE_LOG", str(CHANGE_LOG))

# The (id, record) pairs of a write: ARGV[5] holds the ids and ARGV[6] their
# records, each concatenated, all records of one width. Two arguments rather
# than two an id: redis-py took longer to pack a thousand arguments than the
# server took to run the script (0.56 of 1.0 s a 100k upsert).
_RECORDS = """
local function records(ids, recs)
  local count, i = #ids / 8, 0
  local size = count > 0 and #recs / count or 0
  return function()
    if i >= count then return nil end
    i = i + 1
    return string.sub(ids, i * 8 - 7, i * 8), string.sub(recs, (i - 1) * size + 1, i * size)
  end
end
"""

# KEYS: the shard's record hash, its generation counter, its change log, its
# id count. ARGV: bucket key base, bytes per band, bands, groups, id bytes,
# then ids and records (_RECORDS). An id's record is written last: it is the mark that the
# id is fully in. A replaced id leaves only the buckets of bands whose value
# changed. Returns {ids logged, the generation after, the shard's ids}: the
# writer's cache learns whether its scripts alone moved the generation.
UPSERT = (
    _RECORD_KEY
    + _REMOVE
    + _LOG_CHANGES
    + _RECORDS
    + """
local base = ARGV[1]
local width, bands = tonumber(ARGV[2]), tonumber(ARGV[3])
groups, idw = tonumber(ARGV[4]), tonumber(ARGV[5])
local logged, added = {}, 0
for id, sig in records(ARGV[6], ARGV[7]) do
  local sigs, sid = record_key(id), stored(id)
  local old = redis.call('HGET', sigs, sid)
  if old ~= sig then
    for j = 0, bands - 1 do
      local band = string.char(j)
      local value = string.sub(sig, j * width + 1, (j + 1) * width)
      if old then
        local was = string.sub(old, j * width + 1, (j + 1) * width)
        if was ~= value then
          remove(base .. band .. was, sid)
          redis.call('APPEND', base .. band .. value, sid)
        end
      else
        redis.call('APPEND', base .. band .. value, sid)
      end
    end
    redis.call('HSET', sigs, sid, sig)
    logged[#logged + 1] = id
    if not old then added = added + 1 end
  end
end
log_changes(logged)
counted(added)
return {#logged, tonumber(redis.call('GET', KEYS[2]) or '0'), size()}
"""
)

# KEYS as UPSERT; ARGV: bucket key base, bytes per band, bands, groups, id
# bytes, then the ids, one argument each. Returns how many existed.
DELETE = (
    _RECORD_KEY
    + _REMOVE
    + """
local base = ARGV[1]
local width, bands = tonumber(ARGV[2]), tonumber(ARGV[3])
groups, idw = tonumber(ARGV[4]), tonumber(ARGV[5])
local removed = 0
for i = 6, #ARGV do
  local id = ARGV[i]
  local sigs, sid = record_key(id), stored(id)
  local old = redis.call('HGET', sigs, sid)
  if old then
    for j = 0, bands - 1 do
      remove(base .. string.char(j) .. string.sub(old, j * width + 1, (j + 1) * width), sid)
    end
    redis.call('HDEL', sigs, sid)
    for _, at in ipairs(redis.call('LPOS', KEYS[3], id, 'COUNT', 0)) do redis.call('LSET', KEYS[3], at, TOMBSTONE) end
    removed = removed + 1
  end
end
counted(-removed)
if size() == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end
return removed
""".replace("TOMBSTONE", f'"{TOMBSTONE}"')
)

# The change log as a reader sees it: the shard's generation and size, the
# ids written since the generation ``known`` that the reader's signature
# cache is up to date with (-1: none), and 1 if those are all of them (else
# the reader drops its cached shard).
_CHANGES = """
local function changes(known)
  local generation = tonumber(redis.call('GET', KEYS[2]) or '0')
  local changed, covered = '', 0
  local gap = generation - known
  if known >= 0 and gap == 0 then
    covered = 1
  elseif known >= 0 and gap > 0 and gap <= redis.call('LLEN', KEYS[3]) then
    changed, covered = table.concat(redis.call('LRANGE', KEYS[3], -gap, -1)), 1
  end
  return generation, size(), changed, covered
end
"""

# KEYS as UPSERT. ARGV: the generation the client's cache knows, groups.
# Returns {generation, ids in the shard, ids changed since, 1 if complete}.
# A client whose cache holds the shard sends this ahead of plain MGETs of its
# queries' buckets, in one pipeline: in a script, each bucket name and each
# bucket read becomes a Lua string, which cost the server 0.2 ms of a 0.25 ms
# query at 100k (198 buckets; ad hoc, INFO commandstats), and MGET alone takes
# 0.05 ms. The names cost the client instead (redis-py packs them in
# Python, about 0.16 ms for 198 in an ad hoc timing), which is off the
# server's one thread and shared by the client's processes. The buckets are
# read after the log, so every write acknowledged before the query is in one
# or the other; a write that lands between them is in the next reply's log.
CHANGES = (
    _RECORD_KEY
    + _CHANGES
    + """
groups = tonumber(ARGV[2])
local generation, size, changed, covered = changes(tonumber(ARGV[1]))
return {generation, size, changed, covered}
"""
)

# KEYS as UPSERT. ARGV: bucket key base, the width of one bucket suffix, all
# the suffixes to read concatenated into one string (one argument, not one a
# bucket: cheaper for the client to pack), the generation the
# client's cache knows (-1 for none), the most candidates the client keeps
# (the reply carries signatures for about that many, from the first buckets
# on, less any without a record; the client fetches any others it keeps),
# groups and id bytes. For a client whose signature cache does not hold the
# shard yet: it gets the distinct ids and their signatures in the same atomic
# step as the buckets, so a query is one round trip while its cache fills.
# Returns {generation, ids in the shard, the non-empty probed buckets, the
# ids changed since the client's generation, 1 if those are all of them, the
# stored ids it found records for, and those records}: the client joins,
# counts and dedupes the bucket ids with numpy (joining them here with
# table.concat cost the server 0.35 ms a query at 384 buckets).
QUERY = (
    _RECORD_KEY
    + _CHANGES
    + """
local base, width, keys = ARGV[1], tonumber(ARGV[2]), ARGV[3]
groups, idw = tonumber(ARGV[6]), tonumber(ARGV[7])
local names, buckets = {}, {}
for at = 1, #keys, width do names[#names + 1] = base .. string.sub(keys, at, at + width - 1) end
for start = 1, #names, 4000 do
  local got = redis.call('MGET', unpack(names, start, math.min(start + 3999, #names)))
  for i = 1, #got do if got[i] then buckets[#buckets + 1] = got[i] end end
end
local generation, size, changed, covered = changes(tonumber(ARGV[4]))
local seen, ids, sigs, cap = {}, {}, {}, tonumber(ARGV[5])
for _, bucket in ipairs(buckets) do
  for at = 1, #bucket, idw do
    local sid = string.sub(bucket, at, at + idw - 1)
    if not seen[sid] then seen[sid] = true; ids[#ids + 1] = sid end
  end
  if #ids >= cap then break end
end
local kept = {}  -- an id a bucket names but no record holds (lost in a failover) is left out
if groups == 0 then
  for start = 1, #ids, 2000 do
    local got = redis.call('HMGET', KEYS[1], unpack(ids, start, math.min(start + 1999, #ids)))
    for i = 1, #got do
      if got[i] then kept[#kept + 1] = ids[start + i - 1]; sigs[#sigs + 1] = got[i] end
    end
  end
else
  for i = 1, #ids do
    local sig = redis.call('HGET', record_key(full(ids[i])), ids[i])
    if sig then kept[#kept + 1] = ids[i]; sigs[#sigs + 1] = sig end
  end
end
return {generation, size, buckets, changed, covered, table.concat(kept), table.concat(sigs)}
"""
)

# KEYS: configuration, projection. ARGV: their values if the prefix is new.
# Returns the stored pair, so racing creators all end up with the first one.
OPEN = """
local cfg = redis.call('GET', KEYS[1])
if not cfg then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[1], ARGV[1])
  return {ARGV[1], ARGV[2]}
end
return {cfg, redis.call('GET', KEYS[2])}
"""

# Leases serialise writers of one id across clients and processes. With a
# store lshrs owns, a write is two steps on two systems (the vector, then the
# index; or the index, then the vector), and an ingest and a delete of the
# same id that interleave leave the index naming a vector the store lacks.
# A writer leases its ids before the first step and releases them after the
# second. A lease is ``<expiry ms>:<token>`` in the shard's lease hash, so a
# crashed writer's leases lapse by themselves.
# KEYS: the shard's lease hash. ARGV: token, lifetime in ms, then the ids.
# All or nothing: returns 1 if every id is now leased to the token, else 0.
LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
for i = 3, #ARGV do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held then
    local colon = string.find(held, ':', 1, true)
    if string.sub(held, colon + 1) ~= token and tonumber(string.sub(held, 1, colon - 1)) > now then return 0 end
  end
end
local value = string.format('%d', now + tonumber(ARGV[2])) .. ':' .. token
for i = 3, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], value) end
return 1
"""

# KEYS and ARGV as LEASE, without the lifetime: drops the token's own leases.
RELEASE = """
local suffix = ':' .. ARGV[1]
for i = 2, #ARGV do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held and string.sub(held, -#suffix) == suffix then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"""

# Whether a bucket string holds a stored id: a plain find, kept only at an
# id boundary (a match across two ids' bytes is not the id).
_CONTAINS = """
local function contains(ids, sid)
  local at = string.find(ids, sid, 1, true)
  while at do
    if (at - 1) % idw == 0 then return true end
    at = string.find(ids, sid, at + 1, true)
  end
  return false
end
"""

# Reconcile, step one: KEYS and ARGV as UPSERT, the records computed afresh
# from the store. Like UPSERT, but no bucket membership is taken on trust: an
# id whose record is unchanged is still looked for in each of its buckets and
# appended where missing (a bucket key lost or evicted), and a new or changed
# id is never appended twice. Returns {added, updated, unchanged, repaired}.
REPAIR = (
    _RECORD_KEY
    + _REMOVE
    + _CONTAINS
    + _LOG_CHANGES
    + _RECORDS
    + """
local base = ARGV[1]
local width, bands = tonumber(ARGV[2]), tonumber(ARGV[3])
groups, idw = tonumber(ARGV[4]), tonumber(ARGV[5])
local added, updated, unchanged, repaired = 0, 0, 0, 0
local logged = {}
for id, sig in records(ARGV[6], ARGV[7]) do
  local sigs, sid = record_key(id), stored(id)
  local old = redis.call('HGET', sigs, sid)
  local fixed = false
  for j = 0, bands - 1 do
    local band = string.char(j)
    local value = string.sub(sig, j * width + 1, (j + 1) * width)
    if old and old ~= sig then
      local was = string.sub(old, j * width + 1, (j + 1) * width)
      if was ~= value then remove(base .. band .. was, sid) end
    end
    local key = base .. band .. value
    if not contains(redis.call('GET', key) or '', sid) then
      redis.call('APPEND', key, sid)
      fixed = true
    end
  end
  if old == sig then
    if fixed then repaired = repaired + 1 else unchanged = unchanged + 1 end
  else
    if old then updated = updated + 1 else added = added + 1 end
    redis.call('HSET', sigs, sid, sig)
    logged[#logged + 1] = id
  end
end
log_changes(logged)
counted(added)
return {added, updated, unchanged, repaired}
"""
)

# Reconcile, step three: KEYS[1] the shard's record hash. ARGV: bucket key
# base, bytes per band, groups, id bytes, then bucket keys found by a scan. Removes every id a
# bucket lists whose record does not name that bucket (no record at all: the
# id was lost from the hash, or deleted from the store), and second copies of
# an id. Returns how many.
STRAYS = (
    _RECORD_KEY
    + _REMOVE
    + """
local base = ARGV[1]
local width = tonumber(ARGV[2])
groups, idw = tonumber(ARGV[3]), tonumber(ARGV[4])
local removed = 0
for i = 5, #ARGV do
  local key = ARGV[i]
  local band = string.byte(key, #base + 1)
  local value = string.sub(key, #base + 2)
  local ids = redis.call('GET', key) or ''
  local seen = {}
  for at = 1, #ids, idw do
    local sid = string.sub(ids, at, at + idw - 1)
    local sig = redis.call('HGET', record_key(full(sid)), sid)
    if seen[sid] or not sig or string.sub(sig, band * width + 1, (band + 1) * width) ~= value then
      remove(key, sid)  -- the first copy; a listed id is removed once per copy too many
      removed = removed + 1
    end
    seen[sid] = true
  end
end
return removed
"""
)

# KEYS[1] the shard's record hash; ARGV[1] ids, concatenated, ARGV[2] groups,
# ARGV[3] id bytes.
# Returns one character an id, "1" if it has a record: what a resumed build skips.
HELD = (
    _RECORD_KEY
    + """
groups, idw = tonumber(ARGV[2]), tonumber(ARGV[3])
local ids, out = ARGV[1], {}
for at = 1, #ids, 8 do
  local id = string.sub(ids, at, at + 7)
  out[#out + 1] = redis.call('HEXISTS', record_key(id), stored(id)) == 1 and '1' or '0'
end
return table.concat(out)
"""
)

# KEYS[1] the shard's signature hash (it routes the script to the shard's
# node); ARGV bucket keys of that shard. SET trims a string to its length,
# which APPEND leaves with room to grow.
COMPACT = """
for i = 1, #ARGV do
  local ids = redis.call('GET', ARGV[i])
  if ids then redis.call('SET', ARGV[i], ids) end
end
return #ARGV
"""

# KEYS[1] the shard's signature hash (routing, as COMPACT); ARGV bucket keys
# of that shard. Returns each key's length and MEMORY USAGE, in turn (0 for a
# key deleted since the scan): one command for a thousand keys. A pipeline of
# two commands a key took 0.18-0.31 s for stats()'s 5,000 buckets at 1M,
# nearly all of it the client packing and parsing 10,000 commands; this,
# 0.015-0.026 s. It only reads, so a Redis over maxmemory still runs it
# (Redis 7 refuses a script without flags at its first write).
BUCKET_SIZES = """
local out = {}
for i = 1, #ARGV do
  out[#out + 1] = redis.call('STRLEN', ARGV[i])
  out[#out + 1] = redis.call('MEMORY', 'USAGE', ARGV[i]) or 0
end
return out
"""

# KEYS as UPSERT; ARGV[1] groups. Sets a grouped shard's id count to the
# records its groups hold (a record lost or written around the scripts
# leaves the count off): reconcile's last step. One atomic pass, one HLEN a
# group.
RECOUNT = """
local total = 0
for g = 0, tonumber(ARGV[1]) - 1 do total = total + redis.call('HLEN', KEYS[1] .. ':' .. g) end
if total > 0 then redis.call('SET', KEYS[4], total) else redis.call('DEL', KEYS[4]) end
return total
"""
