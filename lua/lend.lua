-- Commit a lend request: lend its reserved books, acknowledge it and publish its event.
-- Runs inside MULTI after WATCH on the user's count, which the caller checked
-- against the limit; everything the commit changes is in this one script, so it
-- happens whole or not at all.
--
-- KEYS[1]  request stream ({NS}:lend-requests)
-- KEYS[2]  events stream ({NS}:events)
-- KEYS[3]  lent-books hash ({NS}:lent-books)
-- KEYS[4]  the user's count ({NS}:user:<user_id>:count)
-- KEYS[5]  this request's reservation set ({NS}:reservations:<request_id>)
-- ARGV[1]  consumer group
-- ARGV[2]  request entry id
-- ARGV[3]  user id
-- ARGV[4]  event field `skipped` (comma-separated)
-- ARGV[5..] the books the caller saw reserved, in request order (at least one)
--
-- Returns 1 when lent; 0 when the entry was already finished elsewhere (nothing
-- written); -1 when the reservation no longer matches what the caller decided on
-- (another worker processing the same entry added to it): decide again.
local books = {}
for i = 5, #ARGV do books[#books + 1] = ARGV[i] end
if redis.call('SCARD', KEYS[5]) ~= #books then return -1 end
for _, book in ipairs(books) do
  if redis.call('SISMEMBER', KEYS[5], book) == 0 then return -1 end
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('INCRBY', KEYS[4], #books)
local owners = {}
for _, book in ipairs(books) do
  owners[#owners + 1] = book
  owners[#owners + 1] = ARGV[3]
end
redis.call('HSET', KEYS[3], unpack(owners))
redis.call('DEL', KEYS[5])
redis.call('XADD', KEYS[2], '*',
  'request_id', ARGV[2], 'action', 'lend', 'user_id', ARGV[3], 'status', 'accepted',
  'books', table.concat(books, ','), 'skipped', ARGV[4], 'reason', '')
return 1
