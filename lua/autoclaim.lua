#!lua flags=allow-oom
-- Take over entries idle on other consumers, a page at a time as XAUTOCLAIM ... JUSTID
-- would, except entries deleted from the stream: those stay pending and are reported.
--
-- Why not XAUTOCLAIM: Redis 7 drops a deleted entry from the pending list as soon as it
-- is claimed (XCLAIM and XAUTOCLAIM alike), and with it the only trace that its request
-- still needs an outcome and a lend's reservation its books back. Left pending, a
-- deleted entry is finished by finish.lua (which acknowledges it); a caller that dies
-- before that loses nothing: the next one finds the entry again.
--
-- KEYS[1]  the stream
-- ARGV[1]  consumer group
-- ARGV[2]  this consumer
-- ARGV[3]  the least idle time, in milliseconds
-- ARGV[4]  at most this many entries (claimed and deleted together)
-- ARGV[5]  where the page starts: '-', or the cursor the last page returned
--
-- Returns {claimed ids, deleted ids, cursor}, ids in ID order; cursor: where the next
-- page starts ('(' and the last id looked at), '' when this page was the last. Deleted
-- entries stay idle, so without a cursor they would fill every page.
-- allow-oom: a take-over writes nothing that grows (Redis 7 would refuse a flagless
-- script as a whole while out of memory, and entries of dead workers would wait).

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[5], '+', ARGV[4])
local claim, deleted = {}, {}
for _, entry in ipairs(pending) do
  local id = entry[1]
  if #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) == 1 then
    claim[#claim + 1] = id
  else
    deleted[#deleted + 1] = id
  end
end
local cursor = ''
if #pending == tonumber(ARGV[4]) then cursor = '(' .. pending[#pending][1] end
if #claim > 0 then
  claim[#claim + 1] = 'JUSTID'  -- after the ids: unpack() expands fully only as the last argument
  claim = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(claim))
end
return {claim, deleted, cursor}
