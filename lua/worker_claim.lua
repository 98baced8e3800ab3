#!lua
-- Claim a worker id at start, publish what the worker says about itself, and the
-- lending limits it enforces.
--
-- KEYS[1]  this worker's liveness key ({NS}:workers:<worker_id>)
-- KEYS[2]  the ids of workers that started in the namespace ({NS}:workers, a set)
-- KEYS[3]  the limits the workers run with ({NS}:config, a hash)
-- KEYS[4]  this worker's info ({NS}:worker-info:<worker_id>, a hash)
-- KEYS[5..4+N] the liveness keys of the other workers of the set
-- KEYS[5+N..4+2N] their info hashes, in the same order
-- ARGV[1]  this process's token
-- ARGV[2]  time to live in milliseconds
-- ARGV[3]  1 to take the id over even when another token holds it (--force), else 0
-- ARGV[4]  this worker's id
-- ARGV[5]  N; ARGV[6..5+N] the ids of KEYS[5..4+N]
-- ARGV[6+N] M; ARGV[7+N..6+N+M] this worker's info, field/value pairs (M values)
-- ARGV[7+N+M..] this worker's limits, field/value pairs (also kept in its info)
--
-- Returns {1} when this token now holds the id (info and limits are published); {0}
-- when another live process holds the id; {-1, worker, field, theirs, mine} when a live
-- worker runs with other limits: two workers must never enforce different limits. A
-- live worker's limits are read from its info (KEYS[3] may be older data, or edited by
-- hand); for a worker of an older version, which keeps none there, from KEYS[3].
-- Ids of the set whose key expired (workers that died) leave the set. The info hash
-- is written afresh, with the liveness key's TTL.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and ARGV[3] ~= '1' then return {0} end
local n = tonumber(ARGV[5])
local m = tonumber(ARGV[6 + n])
local limits = 7 + n + m
local live, dead = {}, {}
for k = 1, n do
  if redis.call('EXISTS', KEYS[4 + k]) == 1 then
    live[#live + 1] = k
  else
    dead[#dead + 1] = ARGV[5 + k]
  end
end
local function differs(key, worker)
  if redis.call('TYPE', key).ok ~= 'hash' then return nil end
  for k = limits, #ARGV, 2 do
    local theirs = redis.call('HGET', key, ARGV[k])
    if theirs and tonumber(theirs) ~= tonumber(ARGV[k + 1]) then return {-1, worker, ARGV[k], theirs, ARGV[k + 1]} end
  end
end
-- A live worker's own limits are in its info; one of an older version has none there,
-- and KEYS[3] stands in for them.
for _, k in ipairs(live) do
  local info = KEYS[4 + n + k]
  local own = redis.call('TYPE', info).ok == 'hash' and redis.call('HEXISTS', info, ARGV[limits]) == 1
  local refused = differs(own and info or KEYS[3], ARGV[5 + k])
  if refused then return refused end
end
-- A KEYS[3] that is no hash (a hand edit) is replaced.
local config = redis.call('TYPE', KEYS[3]).ok
if config ~= 'hash' and config ~= 'none' then redis.call('DEL', KEYS[3]) end
redis.call('HSET', KEYS[3], unpack(ARGV, limits))
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[4])
if m > 0 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 7 + n, 6 + n + m))
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[4])
if #dead > 0 then redis.call('SREM', KEYS[2], unpack(dead)) end
return {1}
