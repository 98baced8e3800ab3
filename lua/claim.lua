#!lua flags=allow-oom
-- Deliver entries pending on this consumer again, with a delivery counted (XCLAIM), except
-- entries deleted from the stream: those stay pending and are reported (Redis 7's XCLAIM
-- would drop them from the pending list; see autoclaim.lua).
--
-- KEYS[1]  the stream
-- ARGV[1]  consumer group
-- ARGV[2]  this consumer
-- ARGV[3..] the entry ids
--
-- Returns {entries, deleted ids}: the entries as XCLAIM returns them ({id, {field,
-- value, ...}} each), and the ids of those deleted from the stream.
-- allow-oom: a delivery count grows nothing, and resuming must go on while Redis is out
-- of memory (the entries wait for it to end).

local claim, deleted = {}, {}
for k = 3, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[k], ARGV[k], 'COUNT', 1) == 1 then
    claim[#claim + 1] = ARGV[k]
  else
    deleted[#deleted + 1] = ARGV[k]
  end
end
if #claim == 0 then return {claim, deleted} end
return {redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(claim)), deleted}
