#!lua
-- Park a shelving returns entry that keeps failing: a dead letter with the error, and
-- the acknowledgement, in one step.
--
-- KEYS[1]  the entry's stream ({NS}:shelving:returns)
-- KEYS[2]  dead-letters stream ({NS}:dead-letters)
-- KEYS[3]  how many dead letters the cap dropped ({NS}:dead-letters:trimmed, a count)
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3]  how many dead letters KEYS[2] keeps (--dead-letters-maxlen): the oldest
--          beyond it are dropped with the XADD (exact MAXLEN), and counted in KEYS[3]
-- ARGV[4..] dead-letter field/value pairs
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
local counted = redis.call('TYPE', KEYS[3]).ok
if counted ~= 'none' and (counted ~= 'string' or not string.match(redis.call('GET', KEYS[3]), '^%d+$')) then
  return redis.error_reply('WRONGTYPE ' .. KEYS[3] .. ' holds a ' .. counted .. ', not a count')
end
local maxlen = tonumber(ARGV[3])
-- Exact MAXLEN: the letters dropped are those beyond the cap.
local dropped = math.max(0, redis.call('XLEN', KEYS[2]) + 1 - maxlen)
redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, '*', unpack(ARGV, 4))
if dropped > 0 then redis.call('INCRBY', KEYS[3], dropped) end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
