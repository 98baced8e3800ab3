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
-- ARGV[5..4+n] its limits, field/value pairs, as worker_claim.lua published them
-- ARGV[5+n..] info fields to refresh (its counters), field/value pairs
--
-- Returns 1 when renewed, 0 when another process holds the id now (--force), and
-- {3, field, theirs, mine} when the caller must claim the id again (worker_claim.lua)
-- instead: nothing is written. That is when the liveness key is gone (a Redis restart
-- or failover lost it, or it expired while this process stalled), or when KEYS[4] is
-- not exactly this worker's limits (gone, a field missing or other, not a hash). The
-- claim decides with what only it sees, every live worker's own limits: another live
-- worker enforces others (the workers were restarted with new limits while this one
-- stalled, or a hand edit let one start beside it): the claim is refused and this
-- worker stops; none does (Redis came back with older data, a hand edit): it holds the
-- id with its limits published. Publishing them here, blindly, would let two live
-- workers each put back their own, and each commit in turn (commit.lua writes nothing
-- while its limits are not KEYS[4]'s).
-- A renewal is a PEXPIRE, which needs no memory, and comes first: a live worker stays
-- visible while Redis is out of memory (allow-oom on Redis 7; on 6.2 PEXPIRE is never
-- refused, and a script that has written may go on). The counters overwrite fields
-- of the same few bytes.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local limits = tonumber(ARGV[4])
local mismatch = nil
if limits > 0 and redis.call('TYPE', KEYS[4]).ok ~= 'hash' then
  mismatch = {3, ARGV[5], '', ARGV[6]}
else
  for k = 5, 4 + limits, 2 do
    local theirs = redis.call('HGET', KEYS[4], ARGV[k])
    if not theirs or tonumber(theirs) ~= tonumber(ARGV[k + 1]) then
      mismatch = {3, ARGV[k], theirs or '', ARGV[k + 1]}
      break
    end
  end
end
if not holder then return mismatch or {3, '', '', ''} end
if mismatch then return mismatch end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local info = redis.call('TYPE', KEYS[3]).ok
if info ~= 'hash' and info ~= 'none' then redis.call('DEL', KEYS[3]) end  -- a hand edit
if #ARGV > 4 + limits then redis.call('HSET', KEYS[3], unpack(ARGV, 5 + limits)) end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
-- Back in the set after a Redis restart that lost it.
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then redis.call('SADD', KEYS[2], ARGV[3]) end
return 1
