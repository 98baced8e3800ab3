#!lua flags=allow-oom
-- Claim or renew a worker id's liveness key.
--
-- KEYS[1]  worker key ({NS}:workers:<worker_id>)
-- ARGV[1]  this process's token
-- ARGV[2]  time to live in milliseconds
-- ARGV[3]  1 to take the id over even when another token holds it (--force), else 0
--
-- Returns 1 when this token now holds the id, 0 when another live process holds it.
-- A renewal is a PEXPIRE, which needs no memory: a live worker stays visible while
-- Redis is out of memory (allow-oom on Redis 7; on 6.2 PEXPIRE is never refused).
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current and ARGV[3] ~= '1' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
