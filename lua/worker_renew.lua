#!lua flags=allow-oom
-- Renew a worker id's liveness key and its info: the heartbeat.
--
-- KEYS[1]  worker key ({NS}:workers:<worker_id>)
-- KEYS[2]  the ids of workers that started in the namespace ({NS}:workers)
-- KEYS[3]  this worker's info ({NS}:worker-info:<worker_id>, a hash)
-- KEYS[4]  the namespace's lending limits ({NS}:config, a hash)
-- ARGV[1]  this process's token
-- ARGV[2]  time to live in milliseconds
-- ARGV[3]  this worker's id
-- ARGV[4]  n: how many of the next arguments are this worker's limits
-- ARGV[5..4+n] its limits, field/value pairs: published again when KEYS[4] is gone
--          (a Redis that lost its data), as worker_claim.lua published them
-- ARGV[5+n..] info fields to refresh (its counters), field/value pairs
--
-- Returns 1 when renewed, 2 when the liveness key was gone and is taken again (a Redis
-- restart or a failover lost it, or it expired while this process stalled: nobody else
-- holds the id), 0 when another process holds the id now (--force), and {3, field,
-- theirs, mine} when the key was gone and KEYS[4] holds other limits. Then nothing is
-- written: either the workers were restarted with new limits while this one stalled,
-- and it must not come back with its own (two sets of limits would let storage or a
-- user go over the new ones), or Redis came back with older data. The caller tells the
-- two apart by claiming the id again (worker_claim.lua refuses while a worker with
-- other limits is live).
-- Returns 4 when the key is held by this process and KEYS[4] held other limits, or
-- missed one, or was no hash: they are published again. While this worker was live no worker with other limits could
-- start (worker_claim.lua), so Redis came back with older data or KEYS[4] was edited by
-- hand; commit.lua writes nothing while they differ.
-- A renewal is a PEXPIRE, which needs no memory, and comes first: a live worker stays
-- visible while Redis is out of memory (allow-oom on Redis 7; on 6.2 PEXPIRE is never
-- refused, and a script that has written may go on). The counters overwrite fields
-- of the same few bytes. Taking the key again is a SET, the first write (on 6.2 refused
-- as a whole while Redis is out of memory: the next heartbeat tries again).
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local limits = tonumber(ARGV[4])
-- KEYS[4] is published again, whole, when it is gone, misses a field (the tools would
-- assume a default), is no hash (a hand edit: replaced), or, while this worker holds its
-- key, holds other values.
local published = redis.call('TYPE', KEYS[4]).ok
local differ, incomplete = false, published ~= 'hash'
for k = 5, published == 'hash' and 4 + limits or 0, 2 do
  local theirs = redis.call('HGET', KEYS[4], ARGV[k])
  if not theirs then
    incomplete = true
  elseif tonumber(theirs) ~= tonumber(ARGV[k + 1]) then
    if not holder then return {3, ARGV[k], theirs, ARGV[k + 1]} end
    differ = true
  end
end
if holder then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if #ARGV > 4 + limits then redis.call('HSET', KEYS[3], unpack(ARGV, 5 + limits)) end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if limits > 0 and (differ or incomplete) then
  if published ~= 'hash' and published ~= 'none' then redis.call('DEL', KEYS[4]) end
  redis.call('HSET', KEYS[4], unpack(ARGV, 5, 4 + limits))
end
-- Back in the set after a Redis restart that lost it.
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then redis.call('SADD', KEYS[2], ARGV[3]) end
if limits > 0 and (differ or (incomplete and published ~= 'none')) then return 4 end
if holder then return 1 end
return 2
