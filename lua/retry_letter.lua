#!lua
-- Queue a dead letter's original entry again and delete the letter, in one step, and only
-- while the letter is still there: operators retrying one letter at once queue it once.
--
-- KEYS[1]  dead-letters stream ({NS}:dead-letters)
-- KEYS[2]  the stream to queue on: the letter's own (a request stream or
--          {NS}:shelving:returns)
-- ARGV[1]  the letter's id
-- ARGV[2..] field/value pairs of the entry to queue
--
-- Returns the new entry's id, or false when the letter is gone (nothing written).
-- Failure first: the XADD is the first write, so when it fails (out of memory, a stream
-- whose IDs are used up) the letter stays.

if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1], 'COUNT', 1) == 0 then return false end
local queued = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return queued
