-- Process a return request: take back the books lent to the user, refill storage up
-- to its capacity, hand the rest to shelving, acknowledge and publish the event.
--
-- KEYS[1]  request stream ({NS}:return-requests)
-- KEYS[2]  events stream ({NS}:events)
-- KEYS[3]  lent-books hash ({NS}:lent-books)
-- KEYS[4]  the user's count ({NS}:user:<user_id>:count)
-- KEYS[5]  automated storage set ({NS}:storage)
-- KEYS[6]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[7]  books the library took from shelving ({NS}:from-shelving): book -> context
-- ARGV[1]  consumer group
-- ARGV[2]  request entry id
-- ARGV[3]  user id
-- ARGV[4]  storage capacity
-- ARGV[5]  reason to give when none of the books is lent to the user
-- ARGV[6..] book ids, duplicates already removed
--
-- Returns 0 when the entry was already finished elsewhere (nothing written), else
-- {status, returned books (comma-separated), skipped books (comma-separated)}.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end

local returned, skipped = {}, {}
for i = 6, #ARGV do
  local book = ARGV[i]
  if redis.call('HGET', KEYS[3], book) == ARGV[3] then
    redis.call('HDEL', KEYS[3], book)
    returned[#returned + 1] = book
  else
    skipped[#skipped + 1] = book
  end
end

local status, reason = 'denied', ARGV[5]
if #returned > 0 then
  status, reason = 'returned', ''
  -- A count that reaches zero is deleted: a missing count means zero.
  if redis.call('DECRBY', KEYS[4], #returned) <= 0 then redis.call('DEL', KEYS[4]) end
  local room = tonumber(ARGV[4]) - redis.call('SCARD', KEYS[5])
  local rest = {}
  for _, book in ipairs(returned) do
    if room > 0 then
      redis.call('SADD', KEYS[5], book)
      room = room - 1
    else
      rest[#rest + 1] = book
    end
  end
  if #rest > 0 then
    local contexts = redis.call('HMGET', KEYS[7], unpack(rest))
    for i = 1, #contexts do contexts[i] = contexts[i] or '' end
    redis.call('XADD', KEYS[6], '*', 'book_ids', table.concat(rest, ','), 'context_ids', table.concat(contexts, ','))
    redis.call('HDEL', KEYS[7], unpack(rest))
  end
end

local books_csv, skipped_csv = table.concat(returned, ','), table.concat(skipped, ',')
redis.call('XADD', KEYS[2], '*',
  'request_id', ARGV[2], 'action', 'return', 'user_id', ARGV[3], 'status', status,
  'books', books_csv, 'skipped', skipped_csv, 'reason', reason)
return {status, books_csv, skipped_csv}
