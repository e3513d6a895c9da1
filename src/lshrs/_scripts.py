"""Server-side Lua scripts: each runs atomically on the one node owning a shard.

Every key a script touches shares the shard's hash tag, so on a Redis Cluster
the whole script runs on one node; KEYS[1] (the shard's signature hash) routes
it. A bucket key is ``<base><band byte><band value bytes>``, and a band's value
is a byte slice of the signature, so scripts derive bucket keys from stored
signatures and never need the vector or a keyspace scan.
"""

# ARGV: bucket key base, bytes per band, bands, then (id, signature) pairs.
# An id's signature is written last: it is the mark that the id is fully in.
# A replaced id leaves only the buckets of bands whose value changed.
UPSERT = """
local sigs, base = KEYS[1], ARGV[1]
local width, bands = tonumber(ARGV[2]), tonumber(ARGV[3])
local changed = 0
for i = 4, #ARGV, 2 do
  local id, sig = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', sigs, id)
  if old ~= sig then
    for j = 0, bands - 1 do
      local band = string.char(j)
      local value = string.sub(sig, j * width + 1, (j + 1) * width)
      if old then
        local was = string.sub(old, j * width + 1, (j + 1) * width)
        if was ~= value then
          redis.call('SREM', base .. band .. was, id)
          redis.call('SADD', base .. band .. value, id)
        end
      else
        redis.call('SADD', base .. band .. value, id)
      end
    end
    redis.call('HSET', sigs, id, sig)
    changed = changed + 1
  end
end
return changed
"""

# ARGV: bucket key base, bytes per band, bands, then ids. Returns how many existed.
DELETE = """
local sigs, base = KEYS[1], ARGV[1]
local width, bands = tonumber(ARGV[2]), tonumber(ARGV[3])
local removed = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local old = redis.call('HGET', sigs, id)
  if old then
    for j = 0, bands - 1 do
      redis.call('SREM', base .. string.char(j) .. string.sub(old, j * width + 1, (j + 1) * width), id)
    end
    redis.call('HDEL', sigs, id)
    removed = removed + 1
  end
end
return removed
"""

# ARGV: bucket key base, candidate cap, then bucket suffixes to read.
# Returns {space-separated ids, their signatures concatenated}: two bulk
# strings parse far faster on the client than thousands of replies.
# Past the cap, keep the ids found in the most probed buckets.
QUERY = """
local sigs, base, cap = KEYS[1], ARGV[1], tonumber(ARGV[2])
local keys = {}
for i = 3, #ARGV do keys[#keys + 1] = base .. ARGV[i] end
local ids = redis.call('SUNION', unpack(keys))
if #ids > cap then
  local counts, hist = {}, {}
  for _, key in ipairs(keys) do
    for _, id in ipairs(redis.call('SMEMBERS', key)) do counts[id] = (counts[id] or 0) + 1 end
  end
  for _, c in pairs(counts) do hist[c] = (hist[c] or 0) + 1 end
  local cutoff, kept = #keys, 0
  while cutoff > 1 and kept + (hist[cutoff] or 0) < cap do
    kept = kept + (hist[cutoff] or 0)
    cutoff = cutoff - 1
  end
  ids = {}
  local room = cap - kept
  for id, c in pairs(counts) do
    if c > cutoff then ids[#ids + 1] = id
    elseif c == cutoff and room > 0 then ids[#ids + 1] = id; room = room - 1 end
  end
end
local found_ids, found_sigs = {}, {}
for start = 1, #ids, 2000 do
  local chunk = {unpack(ids, start, math.min(start + 1999, #ids))}
  local got = redis.call('HMGET', sigs, unpack(chunk))
  for i = 1, #chunk do
    if got[i] then
      found_ids[#found_ids + 1] = chunk[i]
      found_sigs[#found_sigs + 1] = got[i]
    end
  end
end
return {table.concat(found_ids, ' '), table.concat(found_sigs)}
"""

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
