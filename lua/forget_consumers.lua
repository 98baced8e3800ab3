#!lua flags=allow-oom
-- Remove dead consumers from a consumer group: those whose worker is not live and that
-- hold no pending entry. Both are checked here, in the same step as the removal:
-- XGROUP DELCONSUMER drops a consumer's pending entries with it (never ours to lose),
-- and a worker that starts under that name claims its liveness key before it reads.
--
-- KEYS[1]  the stream
-- KEYS[2..1+N] the liveness key of each consumer's worker ({NS}:workers:<name>)
-- ARGV[1]  consumer group
-- ARGV[2..1+N] the consumers' names
--
-- Returns the names removed. allow-oom: it only deletes (Redis 6.2 still refuses XGROUP
-- while out of memory: the next round removes them).
local removed = {}
for k = 2, #ARGV do
  local name = ARGV[k]
  if redis.call('EXISTS', KEYS[k]) == 0
      and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed[#removed + 1] = name
  end
end
return removed
