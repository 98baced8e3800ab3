#!lua
-- Park a shelving returns entry that keeps failing: a dead letter with the error, and
-- the acknowledgement, in one step.
--
-- KEYS[1]  the entry's stream ({NS}:shelving:returns)
-- KEYS[2]  dead-letters stream ({NS}:dead-letters)
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3..] dead-letter field/value pairs
--
-- Returns 1 when parked here, 0 when the entry was no longer pending (nothing written).
-- Failure first: checks before the first write, an XADD.

local MAX_MS = '18446744073709551615-'
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' and string.find(info[k + 1], MAX_MS, 1, true) == 1 then
      return redis.error_reply('STREAMFULL ' .. KEYS[2] .. ' has used up its entry IDs: no entry can be added')
    end
  end
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
