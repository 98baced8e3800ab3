#!lua flags=allow-oom
-- Keep this consumer's entries: reset the idle time of those still pending on it, so
-- that no other consumer takes over entries a live worker is processing or will retry.
-- (Like a visibility-timeout extension; XCLAIM ... JUSTID counts no delivery.)
--
-- KEYS[1]  a consumed stream
-- ARGV[1]  consumer group
-- ARGV[2]  consumer (this worker)
-- ARGV[3], ARGV[4]  the lowest and highest of the ids below
-- ARGV[5..] entry ids this consumer holds in memory (in flight or waiting for a retry)
--
-- Returns the number of entries renewed. Entries another consumer has taken over are
-- left alone: renewing must never take an entry back. So are entries deleted from the
-- stream: Redis 7's XCLAIM would drop them from the pending list, and the commit of
-- one in flight would then find it finished and leave its reservation behind (see
-- autoclaim.lua).
-- allow-oom: renewing uses no memory, and must go on while Redis is out of memory.

local mine = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 1000000, ARGV[2])) do
  mine[entry[1]] = true
end
local ids = {}
for k = 5, #ARGV do
  if mine[ARGV[k]] and #redis.call('XRANGE', KEYS[1], ARGV[k], ARGV[k], 'COUNT', 1) == 1 then ids[#ids + 1] = ARGV[k] end
end
local n = #ids
if n > 0 then
  ids[n + 1] = 'JUSTID'  -- after the ids: unpack() expands fully only as the last argument
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
end
return n
