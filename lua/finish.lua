-- Finish a stream entry without lending: give back whatever its reservation holds,
-- acknowledge it, publish its event and, for a poison entry, keep a dead letter.
-- Used for rejected, denied and failed outcomes of both request streams, and for
-- dead-lettering a shelving returns entry (no reservation, no event).
--
-- KEYS[1]  the entry's stream
-- KEYS[2]  events stream ({NS}:events)
-- KEYS[3]  automated storage set ({NS}:storage)
-- KEYS[4]  a lend request's reservation set ({NS}:reservations:<request_id>)
-- KEYS[5]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[6]  dead-letters stream ({NS}:dead-letters)
-- KEYS[7]  books the library took from shelving ({NS}:from-shelving): book -> context
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3]  storage capacity
-- ARGV[4]  1 to give back the reservation KEYS[4] (lend requests), 0 to leave it alone
--          (return entries are numbered apart from lend entries: same ids, other requests)
-- ARGV[5]  P, number of event fields (0: no event); ARGV[6..5+2P] event field/value pairs
-- ARGV[6+2P..] dead-letter field/value pairs (none: no dead letter)
--
-- Returns 1 when finished here, 0 when the entry was already finished elsewhere
-- (then nothing is written: the reservation was emptied by whoever finished it,
-- and nothing can be added to it once the entry is acknowledged).
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end

-- Give the reserved books back: refill storage up to its capacity, the rest to shelving.
local books = {}
if ARGV[4] == '1' then books = redis.call('SMEMBERS', KEYS[4]) end
if #books > 0 then
  local room = tonumber(ARGV[3]) - redis.call('SCARD', KEYS[3])
  local rest = {}
  for _, book in ipairs(books) do
    if room > 0 then
      redis.call('SADD', KEYS[3], book)
      room = room - 1
    else
      rest[#rest + 1] = book
    end
  end
  if #rest > 0 then
    -- Each book goes back with the context it was handed out to, and leaves the
    -- library's record: shelving frees it only if it still has it for that context.
    local contexts = redis.call('HMGET', KEYS[7], unpack(rest))
    for i = 1, #contexts do contexts[i] = contexts[i] or '' end
    redis.call('XADD', KEYS[5], '*', 'book_ids', table.concat(rest, ','), 'context_ids', table.concat(contexts, ','))
    redis.call('HDEL', KEYS[7], unpack(rest))
  end
  redis.call('DEL', KEYS[4])
end

local last_event_arg = 5 + 2 * tonumber(ARGV[5])
if last_event_arg > 5 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6, last_event_arg))
end
if #ARGV > last_event_arg then
  redis.call('XADD', KEYS[6], '*', unpack(ARGV, last_event_arg + 1))
end
return 1
